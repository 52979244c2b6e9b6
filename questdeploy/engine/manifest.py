"""``engine.json``: what a plan was built from and for, written next to it.

A TensorRT plan runs only on the TensorRT version and the GPU compute capability it was built with; the
manifest records both (plus the ONNX's I/O, shape profile, timestep -> group bins and scale tables, the
ONNX's sha256 and the build flags) so ``check_engine_compatible`` can refuse a wrong engine with a clear
message before TensorRT fails with an opaque one. ``write_triton_repo`` (in ``triton.py``) is re-exported
here: the manifest is what it reads.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from .. import __version__
from ..runfolder import sha256_file
from .errors import EngineError, EngineIncompatibleError
from .graph import detect_form, io_signature, load_model, timestep_table

MANIFEST_NAME = "engine.json"
MANIFEST_FORMAT = "questdeploy.engine/1"


def manifest_path_for(plan_path: str | Path) -> Path:
    return Path(plan_path).parent / MANIFEST_NAME


def onnx_description(onnx_path: str | Path) -> dict:
    """The ONNX part of a manifest (also written by ``--check-only``, where no plan exists)."""
    model = load_model(onnx_path)
    inputs, outputs = io_signature(model)
    info = detect_form(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "path": str(onnx_path), "sha256": sha256_file(Path(onnx_path)), "form": info.form, "opset": opset,
        "inputs": [s.to_dict() for s in inputs], "outputs": [s.to_dict() for s in outputs],
        "timestep_groups": timestep_table(model),
    }


def build_manifest(onnx_path: str | Path, plan_path: str | Path, *, build_info: dict, profile: dict | None = None,
                   lint: dict | None = None) -> dict:
    """Assemble ``engine.json`` for a finished build (``build_info`` = what ``builder.build_engine`` returned)."""
    plan_path = Path(plan_path)
    flags = dict(build_info.get("flags", {}))
    return {
        "format": MANIFEST_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "questdeploy_version": __version__,
        "plan": {"file": plan_path.name, "sha256": sha256_file(plan_path), "bytes": plan_path.stat().st_size},
        "tensorrt": {"version": build_info["tensorrt_version"]},
        "gpu": {"name": build_info.get("gpu"), "compute_capability": str(build_info["compute_capability"])},
        "onnx": onnx_description(onnx_path),
        "shape_profiles": [{name: {"min": r[0], "opt": r[1], "max": r[2]} for name, r in flags.get("shapes", {}).items()}],
        "build": {k: v for k, v in flags.items() if k != "shapes"} | {"seconds": build_info.get("build_seconds")},
        "profile": profile,
        "lint": lint,
    }


def write_manifest(manifest: dict, plan_path: str | Path) -> Path:
    path = manifest_path_for(plan_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".engine.", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def load_manifest(path: str | Path) -> dict:
    """Read ``engine.json`` (or the one beside a ``.plan`` path)."""
    p = Path(path)
    if p.suffix in (".plan", ".engine", ".trt"):
        p = manifest_path_for(p)
    if not p.is_file():
        raise EngineError(f"no engine manifest at {p}",
                          hint="build the engine with `questdeploy build-engine`, which writes engine.json beside the plan")
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise EngineError(f"{p} is not valid JSON ({e})", hint="rebuild the engine") from e
    if data.get("format") != MANIFEST_FORMAT:
        raise EngineError(f"{p}: unknown manifest format {data.get('format')!r} (expected {MANIFEST_FORMAT})",
                          hint="rebuild the engine with this questdeploy version")
    return data


def _version_key(v: str) -> tuple[str, ...]:
    # TensorRT plans are tied to the exact release: compare major.minor.patch (the 4th part is a build number)
    return tuple(str(v).split(".")[:3])


def check_engine_compatible(manifest: dict, trt_version: str | None, compute_capability: str | None) -> None:
    """Refuse an engine built for another TensorRT release or GPU architecture, saying which and what to do."""
    built_trt = manifest.get("tensorrt", {}).get("version")
    built_cc = str(manifest.get("gpu", {}).get("compute_capability"))
    gpu = manifest.get("gpu", {}).get("name") or "?"
    problems = []
    if trt_version is not None and built_trt and _version_key(built_trt) != _version_key(trt_version):
        problems.append(f"it was built with TensorRT {built_trt}, this machine has {trt_version}")
    if compute_capability is not None and built_cc and str(compute_capability) != built_cc:
        problems.append(f"it was built for compute capability {built_cc} ({gpu}), this GPU is {compute_capability}")
    if problems:
        plan = manifest.get("plan", {}).get("file", "the engine")
        raise EngineIncompatibleError(
            f"{plan} cannot run here: " + "; ".join(problems) + ". TensorRT plans only load on the TensorRT "
            "release and GPU architecture they were built for.",
            hint="rebuild it on this machine: `questdeploy build-engine` with the same ONNX and profile "
                 f"(ONNX sha256 {manifest.get('onnx', {}).get('sha256', '?')[:12]}...)",
        )


from .triton import write_triton_repo  # noqa: E402  (re-export: the Triton layout is built from a manifest)

__all__ = [
    "MANIFEST_NAME", "MANIFEST_FORMAT", "manifest_path_for", "onnx_description", "build_manifest", "write_manifest",
    "load_manifest", "check_engine_compatible", "write_triton_repo",
]
