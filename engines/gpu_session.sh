#!/usr/bin/env bash
# The GPU checks of one session on a CUDA host with no network (see engines/README.md, "GPU session").
#
#   bash engines/gpu_session.sh finetune OUT_DIR            # GPU finetune tests + cost table (quest vs full)
#   bash engines/gpu_session.sh rtx-install PIECES_DIR SITE  # reassemble + check the TensorRT-RTX EP archive
#   bash engines/gpu_session.sh rtx OUT_DIR MODEL.onnx ...   # EP test + acceptance/agreement/latency per model
#
# Expects PYTHONPATH to hold the repo and any carried packages (diffusers on images without it).
set -uo pipefail
cd "$(dirname "$0")/.."
phase=$1; shift

case "$phase" in
finetune)
  out=$1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, onnxruntime, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'onnxruntime', onnxruntime.__version__, 'diffusers', diffusers.__version__)"
  python3 -m pytest -p no:cacheprovider -q -s tests/gpu/test_finetune_gpu.py 2>&1 | tail -8
  # quest vs full on the GPU, same options as the README's CPU table; calibration stays on the CPU
  timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_quest.py --device cuda --no-eval --out /tmp/bq \
    --bits "${BENCH_BITS:-w4a8,w4a4,w8a8}" --methods "${BENCH_METHODS:-quest,full}" --extra-for "full=--tla-iters 20 --cma-iters 40"
  cp /tmp/bq/results.json "$out/gpu_finetune_results.json" 2>/dev/null
  for run in /tmp/bq/w*-*; do  # the checkpoints, for evaluation on the CPU machine
    [ -f "$run/finetune/report.json" ] && tar -C "$run" -czf "$out/$(basename "$run").tgz" finetune run.json
  done
  ;;
rtx-install)
  pieces=$1 site=$2
  cat "$pieces"/part-* > "$pieces/rtx.tar.xz" && (cd "$pieces" && sha256sum -c SHA256) || exit 1
  mkdir -p "$site" && tar -xJf "$pieces/rtx.tar.xz" -C "$site" && rm "$pieces/rtx.tar.xz"
  ;;
rtx)
  out=$1; shift
  if [ ! -e /sys/class/drm/card0 ] && [ -z "${QD_GPU_EXPOSED:-}" ]; then
    # onnxruntime finds GPUs only as /sys/class/drm/cardN (its Linux device discovery); a VM whose NVIDIA driver
    # has no DRM module shows none, so every plugin EP lists no device. In a private mount namespace, give the
    # real NVIDIA PCI device that name; the EP then runs on the real GPU. Needs root.
    exec unshare -m env QD_GPU_EXPOSED=1 bash "$0" rtx "$out" "$@"
  fi
  if [ -n "${QD_GPU_EXPOSED:-}" ]; then
    gpu=$(for d in /sys/bus/pci/devices/*; do
      [ "$(cat "$d/vendor")" = 0x10de ] && case $(cat "$d/class") in 0x03*) readlink -f "$d"; break ;; esac; done)
    [ -d /sys/class/drm ] && mount -t tmpfs none /sys/class/drm || mount -t tmpfs none /sys/class
    mkdir -p /sys/class/drm/card0 && ln -s "$gpu" /sys/class/drm/card0/device && echo "exposed $gpu as /sys/class/drm/card0"
  fi
  python3 -m pytest -p no:cacheprovider -q -s tests/gpu/test_engine_gpu.py -k rtx 2>&1 | tail -6
  python3 engines/rtx_ep_check.py "$@" --batch "${RTX_BATCH:-2}" --dim "${RTX_DIM:-77}" --iters "${RTX_ITERS:-50}" \
    --json "$out/rtx_$(date +%s).json"
  ;;
*)
  echo "unknown phase $phase (finetune | rtx-install | rtx)"; exit 2 ;;
esac
