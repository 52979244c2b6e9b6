"""Marker nodes: where each quantizer sits in the exported graph.

During ``torch.onnx.export`` every quantizer's forward is replaced (through
``questdeploy.quant.quantizers.export_hook``) by an identity custom op ``questdeploy::qmarker(x, key)``.
The ONNX translation of that op is a node ``QMarker`` in the private domain ``questdeploy.marker``
with a string attribute ``key``. Nothing of that domain survives lowering (``qdq.lower``): every marker
becomes Q/DQ nodes or disappears, so the files we write use standard ONNX operators only.

Why markers instead of exporting fake-quant ops directly: the legacy exporter cannot emit INT4 and
tops out at opset 20, ``torch.fake_quantize_*`` has no per-timestep scale table, and a marker keeps the
quantizer's *name*, so lowering can pick scales, bits and integer weights from the model (or from a
sibling model with the same structure) without re-tracing.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch

MARKER_DOMAIN = "questdeploy.marker"
MARKER_OP = "QMarker"
MARKER_ATTR = "key"

_lock = threading.Lock()
_registered = False


def _register() -> None:
    """Register the torch custom op and the ONNX schema once per process (idempotent)."""
    global _registered
    with _lock:
        if _registered:
            return
        import onnx
        from onnx.defs import OpSchema

        try:
            torch.ops.questdeploy.qmarker  # noqa: B018 - already defined (e.g. module reloaded)
        except (AttributeError, RuntimeError):

            @torch.library.custom_op("questdeploy::qmarker", mutates_args=())
            def qmarker(x: torch.Tensor, key: str) -> torch.Tensor:
                return x.clone()

            @qmarker.register_fake
            def _(x, key):
                return torch.empty_like(x)

        try:
            onnx.defs.get_schema(MARKER_OP, 1, MARKER_DOMAIN)
        except onnx.defs.SchemaError:
            schema = OpSchema(
                MARKER_OP,
                MARKER_DOMAIN,
                1,
                doc="questdeploy quantizer position marker (identity); removed before the model is saved",
                inputs=[OpSchema.FormalParameter("x", "T")],
                outputs=[OpSchema.FormalParameter("y", "T")],
                type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float tensors")],
                attributes=[OpSchema.Attribute(MARKER_ATTR, OpSchema.AttrType.STRING, "quantizer key")],
            )
            onnx.defs.register_schema(schema)
        _registered = True


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: qmarker -> QMarker node."""
    _register()
    import onnxscript

    opset = onnxscript.values.Opset(MARKER_DOMAIN, 1)

    def qmarker_onnx(x, key: str):
        return opset.QMarker(x, key=key)

    return {torch.ops.questdeploy.qmarker.default: qmarker_onnx}


@dataclass
class MarkerRecord:
    """What the hook saw: key -> quantizer module (keys are the quantizer names, made unique)."""

    quantizers: dict[str, torch.nn.Module] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # disabled quantizers (left float)

    def key_for(self, q: torch.nn.Module) -> str:
        base = getattr(q, "name", "") or f"quantizer_{id(q):x}"
        key, i = base, 1
        while key in self.quantizers and self.quantizers[key] is not q:
            i += 1
            key = f"{base}#{i}"
        return key


@contextlib.contextmanager
def marking(record: MarkerRecord | None = None) -> Iterator[MarkerRecord]:
    """Activate the quantizers' export hook so each enabled quantizer emits a marker node.

    A quantizer that is called twice (shared module) gets the same key both times; lowering then
    quantizes both sites with the same parameters.
    """
    from questdeploy.quant.quantizers import export_hook

    _register()
    record = record if record is not None else MarkerRecord()

    def hook(q, x):
        if not getattr(q, "enabled", True):
            name = getattr(q, "name", "")
            if name not in record.skipped:
                record.skipped.append(name)
            return x
        key = record.key_for(q)
        record.quantizers[key] = q
        return torch.ops.questdeploy.qmarker(x, key)

    with export_hook(hook):
        yield record
