"""Run a TensorRT plan on golden inputs and compare with saved outputs, per timestep.

Golden data is in Polygraphy's JSON format, as ``polygraphy run --save-inputs / --save-outputs`` writes it:
inputs = a list of feed dicts (one per call, i.e. per sampler timestep), outputs = ``RunResults`` (one
runner's list of iteration results) or a plain list of output dicts. The engine runs through Polygraphy's
``EngineFromBytes`` + ``TrtRunner`` (the same runner ``polygraphy run --trt`` uses); metrics per call are
max-abs error, relative L2 and cosine similarity, with their worst values over the trajectory (the last,
nearly clean steps are where quantization error concentrates).

Imports of polygraphy's TensorRT backend happen inside the functions: this module imports without TensorRT.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .builder import import_tensorrt, require_cuda_device
from .errors import EngineError
from .manifest import check_engine_compatible, load_manifest, manifest_path_for


def load_golden_inputs(path: str | Path) -> list[dict[str, np.ndarray]]:
    from polygraphy.json import load_json

    data = load_json(str(path), description="golden inputs")
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise EngineError(f"{path}: expected a list of feed dicts (polygraphy --save-inputs format)",
                          hint="save inputs with `polygraphy run ... --save-inputs FILE` or questdeploy verify")
    return [{k: np.asarray(v) for k, v in d.items()} for d in data]


def load_golden_outputs(path: str | Path, runner: str | None = None) -> list[dict[str, np.ndarray]]:
    """Outputs from a ``RunResults`` JSON (first runner, or ``runner``) or a plain list of dicts."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    data = load_json(str(path), description="golden outputs")
    if isinstance(data, RunResults):
        names = [name for name, _ in data.items()]
        if not names:
            raise EngineError(f"{path}: RunResults is empty", hint="save outputs again")
        pick = runner or names[0]
        if pick not in names:
            raise EngineError(f"{path}: no runner {pick!r}; it has {names}", hint="pick one of those")
        iters = data[pick]
        return [{k: np.asarray(v) for k, v in it.items()} for it in iters]
    if isinstance(data, dict):
        data = [data]
    if isinstance(data, list) and all(isinstance(d, dict) for d in data):
        return [{k: np.asarray(v) for k, v in d.items()} for d in data]
    raise EngineError(f"{path}: not RunResults nor a list of output dicts", hint="use polygraphy --save-outputs format")


@dataclass
class StepMetrics:
    index: int
    timestep: float | None
    output: str
    max_abs: float
    rel_l2: float
    cosine: float


@dataclass
class Comparison:
    steps: list[StepMetrics] = field(default_factory=list)

    def worst(self) -> dict:
        if not self.steps:
            return {}
        return {
            "max_abs": max(s.max_abs for s in self.steps),
            "rel_l2": max(s.rel_l2 for s in self.steps),
            "cosine_min": min(s.cosine for s in self.steps),
            "rel_l2_mean": float(np.mean([s.rel_l2 for s in self.steps])),
            "worst_step": max(self.steps, key=lambda s: s.rel_l2).index,
        }

    def to_dict(self) -> dict:
        return {"steps": [asdict(s) for s in self.steps], "worst": self.worst()}


def compare_arrays(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    """(max-abs, relative L2, cosine) of ``got`` against ``ref`` (float64 math)."""
    a = np.asarray(ref, dtype=np.float64).ravel()
    b = np.asarray(got, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise EngineError(f"output shapes differ: reference {np.shape(ref)} vs engine {np.shape(got)}",
                          hint="run the engine on the same inputs as the reference")
    d = b - a
    max_abs = float(np.max(np.abs(d))) if d.size else 0.0
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    rel = float(np.linalg.norm(d) / na) if na > 0 else float(np.linalg.norm(d))
    cos = float(np.dot(a, b) / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
    return max_abs, rel, cos


def compare_outputs(reference: list[dict], outputs: list[dict], inputs: list[dict] | None = None,
                    timestep_input: str = "timestep") -> Comparison:
    if len(reference) != len(outputs):
        raise EngineError(f"{len(outputs)} engine results for {len(reference)} reference results",
                          hint="compare the same number of calls")
    comp = Comparison()
    for i, (ref, got) in enumerate(zip(reference, outputs)):
        t = None
        if inputs is not None and timestep_input in inputs[i]:
            t = float(np.asarray(inputs[i][timestep_input]).reshape(-1)[0])
        for name, r in ref.items():
            if name not in got:
                raise EngineError(f"the engine has no output {name!r} (it has {sorted(got)})",
                                  hint="the reference came from another model")
            comp.steps.append(StepMetrics(i, t, name, *compare_arrays(r, got[name])))
    return comp


def run_plan(plan_path: str | Path, feeds: list[dict[str, np.ndarray]], *, check_manifest: bool = True,
             refit_onnx: str | Path | None = None) -> list[dict[str, np.ndarray]]:
    """Run ``plan_path`` on each feed dict with Polygraphy's TrtRunner; returns one output dict per feed.

    The plan's ``engine.json`` (when present) is checked against this machine first. A weight-stripped plan
    is refitted from ``refit_onnx`` (or the manifest's ONNX path) before it runs: a stripped plan runs
    without complaint and returns zeros otherwise.
    """
    trt = import_tensorrt()
    dev = require_cuda_device()
    plan_path = Path(plan_path)
    manifest = None
    if manifest_path_for(plan_path).is_file():
        manifest = load_manifest(manifest_path_for(plan_path))
        if check_manifest:
            check_engine_compatible(manifest, trt.__version__, dev.compute_capability)
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    engine = EngineFromBytes(plan_path.read_bytes())()
    if engine is None:
        raise EngineError(f"TensorRT could not deserialize {plan_path}",
                          hint="the plan was built by another TensorRT version or for another GPU; rebuild it here")
    stripped = bool(manifest and manifest.get("build", {}).get("strip_weights"))
    if stripped:
        onnx_path = Path(refit_onnx or manifest["onnx"]["path"])
        _refit_from_onnx(trt, engine, onnx_path)
    outs = []
    with TrtRunner(engine) as runner:
        for feed in feeds:
            res = runner.infer(feed_dict=feed)
            outs.append({k: np.array(v) for k, v in res.items()})
    return outs


def _refit_from_onnx(trt, engine, onnx_path: Path) -> None:
    logger = trt.Logger(trt.Logger.WARNING)
    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
        raise EngineError(f"refitting the weight-stripped plan from {onnx_path} failed",
                          hint="pass the exact ONNX the plan was built from (--refit-onnx)")


def verify_engine(plan_path: str | Path, inputs_json: str | Path, outputs_json: str | Path, *,
                  reference_runner: str | None = None, max_rel_l2: float | None = None) -> dict:
    """``questdeploy verify --engine PLAN``: run the plan on golden inputs, compare per timestep.

    Returns ``{"steps": [...], "worst": {...}, "passed": bool|None}``; ``passed`` is None without a tolerance.
    """
    feeds = load_golden_inputs(inputs_json)
    ref = load_golden_outputs(outputs_json, reference_runner)
    got = run_plan(plan_path, feeds)
    comp = compare_outputs(ref, got, feeds)
    out = comp.to_dict()
    out["passed"] = None if max_rel_l2 is None else bool(out["worst"].get("rel_l2", 0.0) <= max_rel_l2)
    return out


class TrtEngineEps:
    """A noise-prediction callable ``eps(sample, t, cond) -> ndarray`` backed by a plan (for ``eval --engine``).

    Input names follow the export: ``sample``, ``timestep``, ``encoder_hidden_states`` (when the engine has it).
    """

    def __init__(self, plan_path: str | Path):
        self.plan_path = Path(plan_path)
        self._runner = None

    def __enter__(self):
        import_tensorrt()
        require_cuda_device()
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        manifest = load_manifest(manifest_path_for(self.plan_path)) if manifest_path_for(self.plan_path).is_file() else None
        if manifest is not None:
            trt = import_tensorrt()
            check_engine_compatible(manifest, trt.__version__, require_cuda_device().compute_capability)
        self._runner = TrtRunner(EngineFromBytes(self.plan_path.read_bytes()))
        self._runner.activate()
        self._names = {m for m in self._runner.get_input_metadata().keys()}
        return self

    def __exit__(self, *exc):
        if self._runner is not None:
            self._runner.deactivate()
            self._runner = None

    def __call__(self, sample, t, cond=None):
        if self._runner is None:
            raise EngineError("TrtEngineEps used outside `with`", hint="use `with TrtEngineEps(plan) as eps:`")
        x = np.ascontiguousarray(np.asarray(sample, dtype=np.float32))
        feed = {"sample": x, "timestep": np.full((x.shape[0],), float(np.asarray(t).reshape(-1)[0]), np.float32)}
        if "encoder_hidden_states" in self._names and cond is not None:
            feed["encoder_hidden_states"] = np.ascontiguousarray(np.asarray(cond, dtype=np.float32))
        res = self._runner.infer(feed)
        return np.array(next(iter(res.values())))


__all__ = [
    "load_golden_inputs", "load_golden_outputs", "compare_arrays", "compare_outputs", "Comparison", "StepMetrics",
    "run_plan", "verify_engine", "TrtEngineEps",
]
