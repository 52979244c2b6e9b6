"""onnxruntime runner with the session settings that keep Q/DQ graphs faithful.

Settings and why (measured with onnxruntime 1.32.0, CPU):

* ``session.qdq_matmulnbits_accuracy_level = 0``: without it, an INT4 block-quantized DequantizeLinear
  feeding MatMul is fused into ``MatMulNBits`` with accuracy level 4, which quantizes the *activations*
  to int8 on the fly (0.1-0.2 absolute error on outputs ~30). Level 0 keeps float activations.
* ``disabled_optimizers=["QDQPropagationTransformer"]``: at opset 21, ORT's propagation of a DQ through a
  Transpose creates Q/DQ copies that ``QDQS8ToU8Transformer`` then retypes inconsistently, and session
  creation fails (``output_dtype INT8 does not match y_zero_point type UINT8``) at EXTENDED / ALL
  optimization for int8 activations. Disabling ``QDQS8ToU8Transformer`` instead also works but loses
  the int8 MatMul fusion (``MatMulIntegerToFloat``: 8 of 56 fused on the test UNet, vs 56 of 56 this
  way). Our exporter already sinks DQ below Transposes, so the propagation pass has nothing to do on our
  files; disabling it only protects files from other exporters.
* ``optimization``: ``"off"`` (ORT_DISABLE_ALL: every node runs as written, the exact comparison against
  PyTorch), ``"basic"``, ``"extended"``, ``"all"`` (what users deploy; fused kernels may flip an LSB).
* ``threads``: ``intra_op_num_threads`` (None: onnxruntime's default, all cores).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Runner

OPTIMIZATION_LEVELS = ("off", "basic", "extended", "all")
FAITHFUL_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}
DISABLED_OPTIMIZERS = ("QDQPropagationTransformer",)


def session_options(optimization: str = "off", threads: int | None = None, config: dict | None = None,
                    optimized_model_path: str | None = None):
    """``onnxruntime.SessionOptions`` with the faithful settings (see module docstring)."""
    import onnxruntime as ort

    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization must be one of {OPTIMIZATION_LEVELS}, got {optimization!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    for k, v in {**FAITHFUL_SESSION_CONFIG, **(config or {})}.items():
        so.add_session_config_entry(k, str(v))
    if optimized_model_path:
        so.optimized_model_filepath = str(optimized_model_path)
    return so


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX file (or serialized bytes) with onnxruntime.

    ``outputs``: names to fetch (default: all graph outputs). ``providers``: default CPU only.
    ``disabled_optimizers``: default ``DISABLED_OPTIMIZERS``; pass ``()`` to run onnxruntime untouched.
    """

    def __init__(
        self,
        model: str | Path | bytes,
        optimization: str = "off",
        threads: int | None = None,
        providers: list | None = None,
        session_config: dict | None = None,
        disabled_optimizers=DISABLED_OPTIMIZERS,
        outputs: list[str] | None = None,
        name: str | None = None,
        optimized_model_path: str | None = None,
    ):
        label = Path(model).name if isinstance(model, (str, Path)) else "bytes"
        super().__init__(name or f"onnxrt[{optimization}]-{label}")
        if optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(f"optimization must be one of {OPTIMIZATION_LEVELS}, got {optimization!r}")
        self.model = str(model) if isinstance(model, Path) else model
        self.optimization = optimization
        self.threads = threads
        self.providers = providers or ["CPUExecutionProvider"]
        self.session_config = dict(session_config or {})
        self.disabled_optimizers = list(disabled_optimizers or ())
        self.outputs = outputs
        self.optimized_model_path = optimized_model_path
        self.session = None

    def activate_impl(self) -> None:
        import onnxruntime as ort

        so = session_options(self.optimization, self.threads, self.session_config, self.optimized_model_path)
        kwargs = {"disabled_optimizers": self.disabled_optimizers} if self.disabled_optimizers else {}
        self.session = ort.InferenceSession(self.model, so, providers=self.providers, **kwargs)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def deactivate_impl(self) -> None:
        self.session = None

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: v for k, v in feed.items() if k in self.input_names}
        names = self.outputs or self.output_names
        return dict(zip(names, self.session.run(names, feed)))
