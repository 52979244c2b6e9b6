"""onnxruntime CPU latency and file size of the exported forms: FP32 vs INT8 (ort / ort-int / trt / static) vs INT4 weights.

    python benchmarks/bench_onnx.py                       # embedded digits UNet (if trained) + SD-shaped UNet
    python benchmarks/bench_onnx.py --unet path/to/unet   # a diffusers UNet or pipeline folder
    python benchmarks/bench_onnx.py --no-unet --repeats 5 --threads 2,1

Per model: quantize W8A8 (10 timestep groups, weights min-max, activation scales from two random-input
observing passes: scale values do not change latency), trace once, lower to every form,
then time all contenders interleaved (round-robin, rotating start), each in its own fresh session at
optimization level ``all`` with the faithful session settings of ``OnnxRuntimeRunner``; the median of
``--repeats`` calls after one warm-up is reported. ``--threads 2,1`` times every batch once per thread count
(fresh sessions each time). ``ort-int`` is the ``ort`` form with Convs / weight MatMuls as integer GEMMs
(``questdeploy/export/ort_integer.py``). The FP32 baseline is the ``fp`` form of the same trace
(same graph minus Q/DQ). ``ort-quantize_static`` is onnxruntime's own QDQ quantizer (Conv/MatMul inputs
*and outputs*, constant scales) on the FP32 file: not a questdeploy form, a yardstick for what ORT's
integer kernels reach on this model. Prints a markdown table; ``--json`` writes the numbers too.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from questdeploy.export import file_size, lower_marked, save_onnx, trace  # noqa: E402
from questdeploy.export.testing import random_batches, sd_shaped_unet  # noqa: E402
from questdeploy.quant import QuantConfig, quantize_unet  # noqa: E402
from questdeploy.runners import OnnxRuntimeRunner, make_feed  # noqa: E402

DEFAULT_UNET = REPO / "questdeploy" / "zoo" / "weights" / "digits" / "unet"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return ",".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags) or "none"


def load_unet(path: Path):
    from questdeploy.models import load_model

    return load_model(path).unet.eval()


def feeds_for(unet, batch: int, seq_len: int, seed: int = 0) -> dict:
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    cond = None
    if "encoder_hidden_states" in inspect.signature(unet.forward).parameters:
        cond = torch.randn(batch, seq_len, cfg.cross_attention_dim, generator=g)
    return make_feed(x, np.array([500.0], np.float32), cond)


def ort_quantize_static(fp_path: Path, out_path: Path, calib_feeds: list[dict]) -> Path:
    """onnxruntime's own static QDQ quantization (the yardstick row)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, feeds):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(
        str(fp_path), str(out_path), Reader(calib_feeds), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "MatMul"], per_channel=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return out_path


def export_contenders(unet, name: str, workdir: Path, seq_len: int, ort_reference: bool) -> tuple[dict, dict]:
    """Paths of every contender (latency rows) and of the size-only files."""
    cfg_kwargs = dict(num_groups=10, weight_init="minmax")
    t0 = time.time()
    q = quantize_unet(unet, QuantConfig(w_bits=8, a_bits=8, **cfg_kwargs))
    # two observing passes (high and low noise); unobserved groups copy the nearest observed one. Latency does
    # not depend on the scale values, and PyTorch forwards of the big model cost ~20 s each on 2 busy cores.
    q.calibrate_activations(random_batches(q, [900.0, 100.0], 1, seq_len))
    q_trt = quantize_unet(unet, QuantConfig(w_bits=8, a_bits=8, target="trt", **cfg_kwargs))
    q4 = {bs: quantize_unet(unet, QuantConfig(w_bits=4, a_bits=8, weight_granularity="per_block", block_size=bs, **cfg_kwargs))
          for bs in (32, 128)}
    acts = {k: m.scales.detach() for k, m in q.quantizers().items() if hasattr(m, "scales")}
    for other in (q_trt, *q4.values()):
        other.init_weight_scales()
        with torch.no_grad():
            for k, m in other.quantizers().items():
                if k in acts:
                    m.scales.copy_(acts[k])
    log(f"{name}: quantized + calibrated in {time.time() - t0:.0f} s")
    t0 = time.time()
    example = feeds_for(unet, 2, seq_len)
    example = {k: torch.from_numpy(v) for k, v in example.items()}
    example["timestep"] = torch.tensor([500.0, 500.0])
    marked = trace(q, example_inputs=example)
    log(f"{name}: traced in {time.time() - t0:.0f} s ({len(marked.marker_keys)} markers)")
    paths = {}
    for label, form, static, src in [
        ("fp32", "fp", False, q),
        ("int8 ort (per-timestep)", "ort", False, q),
        ("int8 ort (static)", "ort", True, q),
        ("int8 ort-int (per-timestep)", "ort-int", False, q),
        ("int8 ort-int (static)", "ort-int", True, q),
        ("int8 trt (per-timestep)", "trt", False, q_trt),
        ("int8 trt (static)", "trt", True, q_trt),
    ]:
        m, _ = lower_marked(marked, form, static_scales=static, params_from=src)
        paths[label] = save_onnx(m, workdir / f"{name}_{form}{'_static' if static else ''}.onnx")
    sizes = {}
    for bs, q4b in q4.items():
        m, _ = lower_marked(marked, "ort", params_from=q4b)
        sizes[f"int4-weight ort (W4A8, block {bs})"] = save_onnx(m, workdir / f"{name}_w4a8_b{bs}_ort.onnx")
    if ort_reference:
        t0 = time.time()
        calib = [feeds_for(unet, 1, seq_len, seed=s) for s in range(4)]
        try:
            paths["ort-quantize_static (yardstick)"] = ort_quantize_static(paths["fp32"], workdir / f"{name}_ortqs.onnx", calib)
            log(f"{name}: onnxruntime quantize_static in {time.time() - t0:.0f} s")
        except Exception as e:  # the yardstick must not sink the benchmark
            log(f"{name}: onnxruntime quantize_static failed: {type(e).__name__}: {e}")
    return paths, sizes


def time_contenders(paths: dict, feed: dict, repeats: int, threads: int) -> dict[str, float]:
    """Median latency (ms) per contender: fresh sessions, one warm-up, interleaved round-robin calls."""
    runners = {k: OnnxRuntimeRunner(p, optimization="all", threads=threads) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in runners}
    try:
        for r in runners.values():
            r.activate()
            r.infer(feed)
        names = list(runners)
        for i in range(repeats):
            order = names[i % len(names):] + names[: i % len(names)]
            for k in order:
                runners[k].infer(feed)
                times[k].append(runners[k].inference_time * 1000.0)
    finally:
        for r in runners.values():
            r.deactivate()
    return {k: statistics.median(v) for k, v in times.items()}


def bench_model(name: str, unet, args, workdir: Path, seq_len: int) -> dict:
    paths, sizes = export_contenders(unet, name, workdir, seq_len, args.ort_reference)
    result = {"model": name, "params_m": sum(p.numel() for p in unet.parameters()) / 1e6, "latency_ms": {}, "bytes": {}}
    for k, p in {**paths, **sizes}.items():
        result["bytes"][k] = file_size(p)
    for threads in args.threads:
        for b in args.batches:
            t0 = time.time()
            feed = feeds_for(unet, b, seq_len, seed=100 + b)
            result["latency_ms"][f"{threads}t_b{b}"] = time_contenders(paths, feed, args.repeats, threads)
            log(f"{name}: {threads} thread(s), batch {b} timed in {time.time() - t0:.0f} s")
    return result


def print_table(results: list[dict], args) -> None:
    import onnxruntime as ort

    print(f"\nonnxruntime {ort.__version__} CPU, {','.join(map(str, args.threads))} thread(s), optimization 'all', "
          f"median of {args.repeats} interleaved calls; CPU {platform.processor() or platform.machine()} [{cpu_flags()}]\n")
    cols = [(t, b) for t in args.threads for b in args.batches]
    for res in results:
        fp_bytes = res["bytes"]["fp32"]
        print(f"### {res['model']} ({res['params_m']:.1f} M parameters)\n")
        head = "| contender | file MB | size vs FP32 |" + "".join(f" {t}t b{b} ms | speed-up {t}t b{b} |" for t, b in cols)
        print(head)
        print("|" + "---|" * (3 + 2 * len(cols)))
        for k, nbytes in res["bytes"].items():
            row = f"| {k} | {nbytes / 1e6:.2f} | {nbytes / fp_bytes:.3f} |"
            for t, b in cols:
                lat = res["latency_ms"].get(f"{t}t_b{b}", {})
                if k in lat:
                    row += f" {lat[k]:.1f} | {lat['fp32'] / lat[k]:.2f}x |"
                else:
                    row += " - | - |"
            print(row)
        for t, b in cols:
            lat = res["latency_ms"].get(f"{t}t_b{b}", {})
            for form in ("ort", "ort-int", "trt"):
                pt, st = lat.get(f"int8 {form} (per-timestep)"), lat.get(f"int8 {form} (static)")
                if pt and st:
                    print(f"\n{t} thread(s), batch {b}: {form} per-timestep vs static: {100 * (pt / st - 1):+.1f} %", end="")
        print("\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet", type=Path, default=DEFAULT_UNET, help="diffusers UNet / pipeline folder (default: the digits model)")
    ap.add_argument("--no-unet", action="store_true", help="skip the UNet-folder model")
    ap.add_argument("--no-sd", action="store_true", help="skip the random SD-shaped UNet")
    ap.add_argument("--sd-width", default="64,128,256", help="block_out_channels of the SD-shaped UNet")
    ap.add_argument("--sd-layers", type=int, default=1, help="layers_per_block of the SD-shaped UNet")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default=str(min(2, os.cpu_count() or 1)),
                    help="intra-op thread counts, comma-separated (e.g. 2,1): each is timed with fresh sessions")
    ap.add_argument("--no-ort-reference", dest="ort_reference", action="store_false",
                    help="skip onnxruntime's quantize_static yardstick row")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the ONNX files here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.threads = [int(t) for t in str(args.threads).split(",")]
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(args.threads))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if not args.no_unet:
            if args.unet.exists():
                unet = load_unet(args.unet)
                seq = 4
                results.append(bench_model(f"UNet folder {args.unet.name}", unet, args, workdir, seq))
            else:
                log(f"no UNet at {args.unet} (the digits model is not trained yet?); skipping it")
        if not args.no_sd:
            width = tuple(int(w) for w in args.sd_width.split(","))
            unet = sd_shaped_unet(width=width, layers_per_block=args.sd_layers)
            results.append(bench_model(f"SD-shaped UNet {width}, 64x64 latent, 77x768 context", unet, args, workdir, 77))
    print_table(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
