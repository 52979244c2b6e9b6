"""``onnx.reference.ReferenceEvaluator`` runner: an oracle that shares no code with onnxruntime or TensorRT.

It implements QuantizeLinear / DequantizeLinear (opset >= 19) including INT4 and ``block_size``. It is
slow (pure NumPy): use it on small models or single calls.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Runner


class ReferenceRunner(Runner):
    def __init__(self, model, outputs: list[str] | None = None, name: str | None = None):
        label = Path(model).name if isinstance(model, (str, Path)) else type(model).__name__
        super().__init__(name or f"onnx-reference-{label}")
        self.model = model
        self.outputs = outputs
        self.evaluator = None

    def activate_impl(self) -> None:
        import onnx
        from onnx.reference import ReferenceEvaluator

        model = self.model
        if isinstance(model, (str, Path)):
            model = onnx.load(str(model))  # loads external data too
        elif isinstance(model, bytes):
            model = onnx.load_from_string(model)
        self.evaluator = ReferenceEvaluator(model)
        self.input_names = list(self.evaluator.input_names)
        self.output_names = list(self.evaluator.output_names)

    def deactivate_impl(self) -> None:
        self.evaluator = None

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: v for k, v in feed.items() if k in self.input_names}
        names = self.outputs or self.output_names
        return dict(zip(names, self.evaluator.run(names, feed)))
