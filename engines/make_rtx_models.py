"""Write the SD-shaped UNet test set for a TensorRT(-RTX) session: the W8A8 `trt` form (per-timestep scales)
and its float twin in FP32 and FP16 (FP32 inputs and outputs), from one trace. Random weights; activation scales from two observing
passes, as in ``benchmarks/bench_onnx.py`` (latency does not depend on the scale values).

    python engines/make_rtx_models.py OUT_DIR [--width 64,128,256] [--sample-size 64]

Feed the files to ``engines/rtx_ep_check.py`` on the GPU host.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import onnx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from questdeploy.export import lower_marked, save_onnx, trace  # noqa: E402
from questdeploy.export.testing import random_batches, sd_shaped_unet  # noqa: E402
from questdeploy.quant.wrap import QuantConfig, quantize_unet  # noqa: E402


def _fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's FP16 converter, then a topological sort (it appends its input casts at the end)."""
    import onnx_graphsurgeon as gs
    from onnxruntime.transformers.float16 import convert_float_to_float16

    graph = gs.import_onnx(convert_float_to_float16(model, keep_io_types=True))
    return gs.export_onnx(graph.toposort())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", default="64,128,256")
    ap.add_argument("--sample-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=77)
    args = ap.parse_args(argv)
    t0 = time.time()
    unet = sd_shaped_unet(width=tuple(int(w) for w in args.width.split(",")), sample_size=args.sample_size)
    q = quantize_unet(unet, QuantConfig(w_bits=8, a_bits=8, num_groups=10, weight_init="minmax", target="trt"))
    q.init_weight_scales()
    q.calibrate_activations(random_batches(q, [900.0, 100.0], 1, args.seq_len), init_weights=False)
    s = args.sample_size
    example = {"sample": torch.randn(2, 4, s, s), "timestep": torch.tensor([500.0, 500.0]),
               "encoder_hidden_states": torch.randn(2, args.seq_len, unet.config.cross_attention_dim)}
    marked = trace(q, example_inputs=example)
    args.out.mkdir(parents=True, exist_ok=True)
    trt, _ = lower_marked(marked, "trt", params_from=q)
    fp, _ = lower_marked(marked, "fp", params_from=q)
    written = [save_onnx(trt, args.out / "sd_w8a8_trt.onnx"), save_onnx(fp, args.out / "sd_fp32.onnx"),
               save_onnx(_fp16(fp), args.out / "sd_fp16.onnx")]
    for p in written:
        onnx.checker.check_model(str(p))
        print(f"{p} {p.stat().st_size / 2**20:.1f} MiB")
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
