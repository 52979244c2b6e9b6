"""Fake quantization of diffusion UNets: pure math (primitives), quantizer modules, model surgery,
attention processor and the JSON quantization spec. See docs/design.md for the contract."""

from .errors import (
    CalibrationError,
    QuantConfigError,
    QuantError,
    ScaleShapeError,
    SpecError,
    SpecMismatchError,
    TimestepError,
    UnsupportedBitsError,
)
from .primitives import PerAxis, PerBlock, PerTensor, TimestepBins, dequantize, fake_quant, qrange, quantize
from .quantizers import ActQuantizer, WeightQuantizer, export_hook
from .attention import QuantAttnProcessor
from .wrap import QuantConfig, QuantConv2d, QuantizedUNet, QuantLinear, quantize_unet
from .spec import QuantizerSpec, QuantSpec, check_matches, load_checkpoint, save_checkpoint

__all__ = [
    "QuantError", "QuantConfigError", "UnsupportedBitsError", "ScaleShapeError", "TimestepError",
    "CalibrationError", "SpecError", "SpecMismatchError",
    "qrange", "quantize", "dequantize", "fake_quant", "PerTensor", "PerAxis", "PerBlock", "TimestepBins",
    "WeightQuantizer", "ActQuantizer", "export_hook", "QuantAttnProcessor",
    "QuantConfig", "QuantConv2d", "QuantLinear", "QuantizedUNet", "quantize_unet",
    "QuantSpec", "QuantizerSpec", "check_matches", "save_checkpoint", "load_checkpoint",
]
