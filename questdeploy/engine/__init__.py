"""TensorRT engines from the exported ONNX: rule lint (no GPU), build profiles, builder, manifest, Triton
layout, engine runner, and the ``build-engine`` stage function.

Nothing here imports TensorRT at module level; ``tensorrt`` is imported inside the functions that need it
and its absence is a ``TensorRTNotInstalledError`` with an install hint.

Modules: ``lint`` (``lint_model``, ``format_report``), ``profiles`` (``load_profile``, ``parse_range``),
``builder`` (``build_engine``, ``trtexec_command``, ``polygraphy_convert_command``), ``manifest``
(``build_manifest``, ``check_engine_compatible``, ``write_triton_repo``), ``runner`` (``verify_engine``,
``TrtEngineEps``), ``stage`` (``build_engine_stage``).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "lint_model": "lint", "format_report": "lint", "Finding": "lint", "LintReport": "lint",
    "load_profile": "profiles", "parse_range": "profiles", "BuildProfile": "profiles",
    "build_engine": "builder", "BuildOptions": "builder", "trtexec_command": "builder",
    "polygraphy_convert_command": "builder",
    "build_manifest": "manifest", "load_manifest": "manifest", "check_engine_compatible": "manifest",
    "write_triton_repo": "manifest",
    "verify_engine": "runner", "TrtEngineEps": "runner",
    "build_engine_stage": "stage",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
