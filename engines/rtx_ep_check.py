"""Run ONNX files through TensorRT-RTX (onnxruntime plugin EP) and onnxruntime CPU; report acceptance,
agreement and latency. For a GPU session; see engines/README.md ("TensorRT-RTX via ...").

    python engines/rtx_ep_check.py MODEL.onnx [MODEL2.onnx ...] [--batch 2] [--iters 50] [--json out.json]

Per model it prints: whether the EP accepted the graph (session creation + first run), how many nodes it
took (when onnxruntime reports the assignment), max-abs / relative-L2 / cosine against onnxruntime CPU with
optimizations off, and the median / p90 latency of both. Random inputs shaped from the model's inputs
(dynamic dims: batch -> --batch, others -> --dim, default 4); ``timestep`` gets 500.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _feed(sess, batch: int, dim: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feed = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else (batch if k == 0 else dim) for k, d in enumerate(i.shape)]
        dtype = np.float16 if "float16" in i.type else np.float32
        if i.name == "timestep":
            feed[i.name] = np.full(shape or [], 500.0, dtype)
        else:
            feed[i.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def _time(sess, feed, iters: int) -> dict:
    for _ in range(3):
        sess.run(None, feed)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        sess.run(None, feed)
        ts.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": float(np.median(ts)), "p90_ms": float(np.percentile(ts, 90))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dim", type=int, default=4)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    try:
        import onnxruntime_ep_nv_tensorrt_rtx as rtx
    except ImportError:
        print("onnxruntime_ep_nv_tensorrt_rtx is not installed (pip install onnxruntime-ep-nv-tensorrt-rtx-cu12)")
        return 2
    name = rtx.get_ep_name()
    ort.register_execution_provider_library(name, rtx.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
    print(f"onnxruntime {ort.__version__}; EP {name}; devices: {[str(d.device.type) for d in devices] or 'none'}")
    if not devices:
        print("the TensorRT-RTX EP supports no device here (it targets RTX / Ampere+ GPUs)")
        return 3
    results = {}
    for path in args.models:
        r: dict = {"model": path}
        so_cpu = ort.SessionOptions()
        so_cpu.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        cpu = ort.InferenceSession(path, so_cpu, providers=["CPUExecutionProvider"])
        feed = _feed(cpu, args.batch, args.dim)
        ref = cpu.run(None, feed)[0]
        r["cpu"] = _time(cpu, feed, max(5, args.iters // 5))
        try:
            so = ort.SessionOptions()
            so.add_provider_for_devices(devices, {})
            t0 = time.perf_counter()
            sess = ort.InferenceSession(path, sess_options=so)
            got = sess.run(None, feed)[0]
            r["session_and_first_run_s"] = round(time.perf_counter() - t0, 2)
            r["accepted"] = True
        except Exception as e:  # the finding is the message
            r["accepted"] = False
            r["error"] = f"{type(e).__name__}: {e}"
            results[path] = r
            print(json.dumps(r, indent=2))
            continue
        a, b = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
        r["max_abs"] = float(np.abs(a - b).max())
        r["rel_l2"] = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
        r["cosine"] = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
        r["providers"] = sess.get_providers()
        r["rtx"] = _time(sess, feed, args.iters)
        results[path] = r
        print(json.dumps(r, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
