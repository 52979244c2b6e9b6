"""Run ONNX files through TensorRT-RTX (onnxruntime plugin EP) and onnxruntime CPU; report acceptance,
agreement and latency. For a GPU session; see engines/README.md ("TensorRT-RTX via ...").

    python engines/rtx_ep_check.py MODEL.onnx [MODEL2.onnx ...] [--batch 2] [--iters 50] [--json out.json]

Per model it prints: whether the EP accepted the graph (session creation + first runs), whether it took every
node (a first try disables onnxruntime's CPU fallback; on failure the error is kept and a second try allows
it), max-abs / relative-L2 / cosine against onnxruntime CPU with optimizations off at each of ``--timesteps``
(the per-timestep scale groups), and the median / p90 latency of both at the middle timestep. Random inputs
shaped from the model's inputs (dynamic dims: batch -> --batch, others -> --dim, default 4).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[1]))


def _feed(sess, batch: int, dim: int, timestep: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feed = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else (batch if k == 0 else dim) for k, d in enumerate(i.shape)]
        dtype = np.float16 if "float16" in i.type else np.float32
        if i.name == "timestep":
            feed[i.name] = np.full(shape or [], timestep, dtype)
        else:
            feed[i.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def _rtx_session(ort, path: str, devices, allow_cpu_fallback: bool):
    so = ort.SessionOptions()
    if not allow_cpu_fallback:  # creation fails unless the EP takes every node
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.add_provider_for_devices(devices, {})
    return ort.InferenceSession(path, sess_options=so)


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
    ap.add_argument("--timesteps", default="999,500,1", help="compared one by one (per-timestep scale groups)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from questdeploy.engine.rtx import register_rtx_ep, why_no_rtx_device
    from questdeploy.engine.runner import compare_outputs
    from questdeploy.errors import QuestDeployError

    try:
        name, devices = register_rtx_ep(ort)
    except QuestDeployError as e:
        print(f"{e} ({e.hint})")
        return 2
    print(f"onnxruntime {ort.__version__}; EP {name}; devices: {[str(d.device.type) for d in devices] or 'none'}")
    if not devices:
        print(f"the TensorRT-RTX EP offers no device here: {why_no_rtx_device()}")
        return 3
    for d in devices:
        print(f"  device: vendor {d.device.vendor} id {d.device.device_id} metadata {dict(d.device.metadata)} "
              f"ep_metadata {dict(d.ep_metadata)}")
    timesteps = [float(t) for t in args.timesteps.split(",")]
    results = {}
    for path in args.models:
        r: dict = {"model": path, "batch": args.batch, "timesteps": timesteps}
        so_cpu = ort.SessionOptions()
        so_cpu.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # exact Q/DQ reference
        cpu = ort.InferenceSession(path, so_cpu, providers=["CPUExecutionProvider"])
        feeds = [_feed(cpu, args.batch, args.dim, t) for t in timesteps]
        names = [o.name for o in cpu.get_outputs()]
        refs = [dict(zip(names, cpu.run(None, f))) for f in feeds]
        r["cpu"] = _time(cpu, feeds[len(feeds) // 2], max(5, args.iters // 5))
        sess = None
        for fallback in (False, True):
            try:
                t0 = time.perf_counter()
                sess = _rtx_session(ort, path, devices, allow_cpu_fallback=fallback)
                got = [dict(zip(names, sess.run(None, f))) for f in feeds]
                r["session_and_first_runs_s"] = round(time.perf_counter() - t0, 2)
                r["whole_graph_on_ep"] = not fallback
                break
            except Exception as e:  # the finding is the message
                sess = None
                r["error_without_fallback" if not fallback else "error"] = f"{type(e).__name__}: {e}"[:2000]
        if sess is None:
            r["accepted"] = False
            results[path] = r
            print(json.dumps(r, indent=2))
            continue
        r["accepted"] = True
        r["providers"] = sess.get_providers()
        comp = compare_outputs(refs, got, feeds).to_dict()
        r["per_timestep"], r["worst"] = comp["steps"], comp["worst"]
        r["rtx"] = _time(sess, feeds[len(feeds) // 2], args.iters)
        results[path] = r
        print(json.dumps(r, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
