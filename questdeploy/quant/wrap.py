"""Model surgery: turn a diffusers UNet into a fake-quantized ``QuantizedUNet``.

Why a thin layer (torchao's ``quantize_`` mould): *which* layers get *which* quantizers is data
(``QuantConfig`` patterns), applied by one entry point, ``quantize_unet``. The quantized layers are
subclasses of ``nn.Conv2d`` / ``nn.Linear`` with the same parameter names, so a state dict, optimizer
selection by name and diffusers' own forward code keep working unchanged.

Default policy (QuEST + trt-qdq-rules): every Conv2d/Linear gets a weight quantizer and an input
(activation) quantizer; ``conv_in`` / ``conv_out`` activations are forced to 8 bits; the timestep path
(``time_proj`` sinusoids, ``time_embedding`` MLP, extra conditioning embeddings) stays float because
quantizing it destroys the timestep information; attention matmuls are quantized via
``QuantAttnProcessor``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import asdict, dataclass, fields
from fnmatch import fnmatchcase
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .attention import QuantAttnProcessor
from .errors import CalibrationError, QuantConfigError, TimestepError, UnsupportedBitsError
from .primitives import TimestepBins
from .quantizers import ACT_OBSERVERS, SUPPORTED_BITS, ActQuantizer, WeightQuantizer, active_export_hook, weight_granularity_for

__all__ = ["QuantConfig", "QuantConv2d", "QuantLinear", "QuantizedUNet", "quantize_unet", "matches_any"]

TARGETS = ("ort", "trt", "torch")


# --------------------------------------------------------------------------------------------------
# config


def matches_any(name: str, patterns: Iterable[str]) -> str | None:
    """First pattern matching ``name`` or one of its dotted parents (so ``"time_embedding"`` covers
    ``"time_embedding.linear_1"``); fnmatch syntax (``*``, ``?``, ``[..]``). Returns the pattern or None."""
    parts = name.split(".")
    candidates = [".".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        if any(fnmatchcase(c, pat) for c in candidates):
            return pat
    return None


def smoothable(name: str, mod: nn.Module, patterns) -> bool:
    """Whether input smoothing applies to ``mod``: an ungrouped Conv2d or a Linear matching ``patterns`` (a grouped
    conv's input channels do not all meet every weight column, so one factor per channel cannot fold into it)."""
    return isinstance(mod, (nn.Conv2d, nn.Linear)) and getattr(mod, "groups", 1) == 1 and matches_any(name, patterns)


@dataclass
class QuantConfig:
    """Which layers are quantized, how, and with which timestep bins. Validated on construction.

    * ``w_bits`` / ``a_bits``: 4 or 8; ``a_bits=None`` means weight-only (e.g. TensorRT INT4 W4A16).
    * ``weight_granularity``: ``"per_channel"`` (all layers) or ``"per_block"`` (4-bit only; Linear layers
      whose ``in_features`` is divisible by ``block_size``; others fall back to per-channel with a note).
    * ``num_groups`` / ``num_train_timesteps`` build uniform ``TimestepBins``; ``timestep_edges`` overrides.
    * ``keep_float``: patterns of layers left fully float; ``skip``: the timestep path, also left float
      (kept separate so adding ``keep_float`` patterns never drops it by accident); ``act_8bit``: layers
      whose input activations use 8 bits whatever ``a_bits`` is; ``weight_8bit``: layers whose weights stay
      8-bit at ``w_bits=4`` (first and last conv, in force when ``keep_float`` no longer keeps them float;
      ``finetune`` adds the measured most sensitive layers, see ``quant/sensitivity.py``).
    * ``quantize_attention``: explicit-matmul attention with quantized q, k, v (``attn_bits``, default
      ``a_bits``) and softmax probabilities (``probs_bits``, unsigned).
    * ``weight_init``, ``act_observer`` / ``act_percentile`` / ``act_momentum``: calibration defaults;
      ``act_observer_4bit`` for 4-bit activations (``"mse"`` clipping: on the default model it cuts the W4A4
      noise-prediction error 3.5x, while at 8 bits the same clipping is 9x *worse* than the max).
    * ``smooth_alpha`` / ``smooth_layers``: per-input-channel smoothing (SmoothQuant's migration) of the layers
      matching ``smooth_layers``: the input is divided by a per-channel factor ``s`` and the weight multiplied by
      it, so the float function is unchanged while the per-tensor activation quantizer sees flatter channels;
      ``s_c = amax(x_c)^alpha / amax(W_c)^(1 - alpha)`` from calibration (``compute_smoothing``). ``None``: off.
      It exports as a constant per-channel ``Div`` before the layer's QuantizeLinear.
    * ``channel_shift``: the 4-bit input quantizers of the ``smooth_layers`` also centre each input channel per
      timestep group (``ActQuantizer.shifts``, set from calibration ranges) before rounding. onnxruntime
      targets only: it exports as ``Sub`` / ``Add`` around the Q/DQ pair.
    * ``method`` / ``target``: recorded in the spec (``target`` in ``ort``/``trt``/``torch``).
    """

    w_bits: int = 8
    a_bits: int | None = 8
    weight_granularity: str = "per_channel"
    block_size: int = 32
    num_groups: int = 10
    num_train_timesteps: int = 1000
    timestep_edges: tuple[float, ...] | None = None
    keep_float: tuple[str, ...] = ("conv_in", "conv_out")
    skip: tuple[str, ...] = ("time_proj", "time_embedding", "add_time_proj", "add_embedding", "class_embedding")
    act_8bit: tuple[str, ...] = ("conv_in", "conv_out")
    weight_8bit: tuple[str, ...] = ("conv_in", "conv_out")
    quantize_attention: bool = True
    attn_bits: int | None = None
    probs_bits: int = 8
    weight_init: str = "mse"
    act_observer: str = "absmax"
    act_observer_4bit: str = "mse"
    act_percentile: float = 0.9999
    act_momentum: float | None = None
    smooth_alpha: float | None = None
    smooth_layers: tuple[str, ...] = ("*resnets.*.conv1", "*resnets.*.conv2", "*resnets.*.conv_shortcut")
    channel_shift: bool = False
    method: str = "ptq"
    target: str = "ort"

    def __post_init__(self):
        for name in ("keep_float", "skip", "act_8bit", "weight_8bit", "smooth_layers"):
            val = getattr(self, name)
            if isinstance(val, str):
                val = (val,)
            setattr(self, name, tuple(val))
        if self.timestep_edges is not None:
            self.timestep_edges = tuple(float(e) for e in self.timestep_edges)
        self.validate()

    # -- validation --------------------------------------------------------------------------------
    def validate(self) -> "QuantConfig":
        def bits_ok(v, what, allow_none=False):
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v not in SUPPORTED_BITS:
                raise UnsupportedBitsError(
                    f"{what}={v!r} is not supported",
                    hint=f"use {what}=8 or {what}=4" + (" (or None for weight-only)" if allow_none else ""),
                )

        bits_ok(self.w_bits, "w_bits")
        bits_ok(self.a_bits, "a_bits", allow_none=True)
        bits_ok(self.attn_bits, "attn_bits", allow_none=True)
        if self.probs_bits not in (8, 16) or isinstance(self.probs_bits, bool):
            raise UnsupportedBitsError(f"probs_bits={self.probs_bits!r} is not supported", hint="use probs_bits=8 (or 16)")
        if self.weight_granularity not in ("per_channel", "per_block"):
            raise QuantConfigError(
                f"weight_granularity={self.weight_granularity!r} is unknown", hint="use 'per_channel' or 'per_block'"
            )
        if self.weight_granularity == "per_block" and self.w_bits != 4:
            raise QuantConfigError(
                f"weight_granularity='per_block' needs w_bits=4 (got {self.w_bits})",
                hint="block-wise weights are an INT4 layout (TensorRT: never INT8); use per_channel for 8 bits",
            )
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 2:
            raise QuantConfigError(f"block_size={self.block_size!r} must be an int >= 2", hint="e.g. block_size=32")
        self.bins  # validates num_groups / edges
        if self.smooth_alpha is not None and (isinstance(self.smooth_alpha, bool)
                                              or not 0.0 < float(self.smooth_alpha) <= 1.0):
            raise QuantConfigError(f"smooth_alpha={self.smooth_alpha!r} out of (0, 1]",
                                   hint="e.g. 0.7, or None for no input smoothing")
        for name in ("keep_float", "skip", "act_8bit", "weight_8bit", "smooth_layers"):
            if not all(isinstance(p, str) and p for p in getattr(self, name)):
                raise QuantConfigError(f"{name} must be a list of non-empty patterns", hint='e.g. ["conv_in", "*.ff.*"]')
        if self.weight_init not in ("mse", "minmax"):
            raise QuantConfigError(f"weight_init={self.weight_init!r} is unknown", hint="use 'mse' or 'minmax'")
        for name in ("act_observer", "act_observer_4bit"):
            if getattr(self, name) not in ACT_OBSERVERS:
                raise QuantConfigError(f"{name}={getattr(self, name)!r} is unknown", hint="use 'absmax', 'percentile' or 'mse'")
        if not 0.0 < self.act_percentile <= 1.0:
            raise QuantConfigError(f"act_percentile={self.act_percentile} out of (0, 1]", hint="e.g. 0.9999")
        if self.act_momentum is not None and not 0.0 <= self.act_momentum < 1.0:
            raise QuantConfigError(f"act_momentum={self.act_momentum} out of [0, 1)", hint="e.g. 0.95 or None")
        if not isinstance(self.method, str) or not self.method:
            raise QuantConfigError(f"method={self.method!r} must be a non-empty string", hint="e.g. 'ptq' or 'quest'")
        if self.target not in TARGETS:
            raise QuantConfigError(f"target={self.target!r} is unknown", hint=f"use one of {list(TARGETS)}")
        if self.target == "trt" and 4 in (self.a_bits, self.attn_bits):
            raise UnsupportedBitsError(
                "TensorRT has no INT4 activations (INT4 is weight-only there)",
                hint="use a_bits=8 (W4A8 / W8A8) or a_bits=None (W4A16) for target='trt', or target='ort'",
            )
        if not isinstance(self.channel_shift, bool):
            raise QuantConfigError(f"channel_shift={self.channel_shift!r} must be true or false", hint="e.g. false")
        if self.channel_shift and self.target == "trt":
            raise QuantConfigError(
                "channel_shift has no TensorRT form (it only serves 4-bit activations, which TensorRT lacks)",
                hint="use target='ort', or channel_shift=False",
            )
        return self

    @property
    def bins(self) -> TimestepBins:
        if self.timestep_edges is not None:
            return TimestepBins(self.timestep_edges)
        return TimestepBins.uniform(self.num_groups, self.num_train_timesteps)

    @property
    def effective_attn_bits(self) -> int | None:
        return self.attn_bits if self.attn_bits is not None else self.a_bits

    # -- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        d = dict(d)
        d.setdefault("weight_8bit", [])  # specs written before the field existed had no 8-bit weight layers
        unknown = sorted(set(d) - known)
        if unknown:
            raise QuantConfigError(
                f"unknown QuantConfig keys {unknown}",
                hint=f"known keys: {sorted(known)} (a newer questdeploy may have written this file)",
            )
        return cls(**d)


# --------------------------------------------------------------------------------------------------
# quantized layers


class _QuantLayerMixin:
    """Shared by QuantConv2d / QuantLinear: children ``weight_quantizer`` and ``input_quantizer`` (or None)."""

    @classmethod
    def from_float(cls, mod: nn.Module, weight_quantizer: WeightQuantizer | None, input_quantizer: ActQuantizer | None):
        """Convert ``mod`` *in place* (class swap keeps the very same Parameters, hooks and names)."""
        mod.__class__ = cls
        mod.register_module("weight_quantizer", weight_quantizer)
        mod.register_module("input_quantizer", input_quantizer)
        return mod

    def _quant_inputs(self, x):
        smooth = getattr(self, "input_smooth", None)
        if smooth is not None:  # per input channel: channels are dim 1 of a conv input, the last of a linear one
            x = x / (smooth.view(1, -1, *([1] * (x.dim() - 2))) if isinstance(self, nn.Conv2d) else smooth)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        return x, w


class QuantConv2d(_QuantLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` whose input and weight pass through fake-quantizers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self._quant_inputs(x)
        return self._conv_forward(x, w, self.bias)


class QuantLinear(_QuantLayerMixin, nn.Linear):
    """``nn.Linear`` whose input and weight pass through fake-quantizers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self._quant_inputs(x)
        return F.linear(x, w, self.bias)


_LAYER_TYPES = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def _is_attention(m: nn.Module) -> bool:
    return hasattr(m, "set_processor") and hasattr(m, "processor") and hasattr(m, "to_q")


# --------------------------------------------------------------------------------------------------
# the wrapper


class QuantizedUNet(nn.Module):
    """A fake-quantized diffusers UNet (``UNet2DModel`` or ``UNet2DConditionModel``).

    ``forward(sample, timestep, encoder_hidden_states=None)`` returns the noise prediction tensor; the
    timestep group (row of every activation scale table) is looked up from ``timestep``, which must be a
    scalar or a 1-D tensor whose elements are all equal. Quantizer names are qualified names inside the
    wrapped unet (e.g. ``"conv_in.input_quantizer"``); the state dict prefixes them with ``"unet."``.
    """

    def __init__(self, unet: nn.Module, config: QuantConfig, notes: dict[str, str] | None = None):
        super().__init__()
        self.unet = unet
        self.quant_config = config
        self.bins = config.bins
        self.method = config.method
        self.target = config.target
        self.notes = dict(notes or {})
        params = inspect.signature(unet.forward).parameters
        self._conditional = "encoder_hidden_states" in params
        self._act = [m for m in unet.modules() if isinstance(m, ActQuantizer)]
        self._group = 0

    @property
    def config(self):
        """The wrapped unet's diffusers config (so pipeline code reading ``unet.config`` keeps working)."""
        return self.unet.config

    # -- forward -----------------------------------------------------------------------------------
    def group_of(self, timestep) -> int:
        """Timestep group of a scalar or of a 1-D tensor whose elements are all equal."""
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() == 0:
                raise TimestepError("empty timestep tensor", hint="pass one timestep per call")
            flat = timestep.reshape(-1)
            if timestep.dim() > 1 or (flat.numel() > 1 and not bool((flat == flat[0]).all())):
                raise TimestepError(
                    f"all batch elements must share one timestep; got shape {tuple(timestep.shape)} with values "
                    f"{flat[:8].tolist()}{'...' if flat.numel() > 8 else ''}",
                    hint="activation scales are chosen per timestep group: split the batch by timestep "
                    "(samplers step all samples together, so pass one timestep per call)",
                )
            timestep = flat[0].item()
        return self.bins.group(timestep)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None, **unet_kwargs):
        if active_export_hook() is None:  # under export the hook owns the scale lookup (no .item() in traces)
            self.set_timestep_group(self.group_of(timestep))
        if self._conditional:
            if encoder_hidden_states is None:
                raise QuantConfigError(
                    f"{type(self.unet).__name__} needs encoder_hidden_states",
                    hint="pass the conditioning (B, T, D) tensor, e.g. the class embeddings of the labels",
                )
            out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **unet_kwargs)
        else:
            if encoder_hidden_states is not None:
                raise QuantConfigError(
                    f"{type(self.unet).__name__} takes no encoder_hidden_states",
                    hint="pass encoder_hidden_states=None for an unconditional UNet2DModel",
                )
            out = self.unet(sample, timestep, return_dict=False, **unet_kwargs)
        return out[0]

    # -- groups / quantizers -----------------------------------------------------------------------
    @property
    def timestep_group(self) -> int:
        return self._group

    def set_timestep_group(self, g: int) -> None:
        g = int(g)
        if not 0 <= g < self.bins.num_groups:
            raise TimestepError(
                f"timestep group {g} out of range [0, {self.bins.num_groups})",
                hint="use bins.group(t) to map a timestep to its group",
            )
        self._group = g
        for q in self._act:
            q.group = g

    def quantizers(self) -> dict[str, nn.Module]:
        """All weight and activation quantizers, keyed by qualified name inside the unet."""
        return {n: m for n, m in self.unet.named_modules() if isinstance(m, (WeightQuantizer, ActQuantizer))}

    def quant_layers(self) -> dict[str, nn.Module]:
        """All QuantConv2d / QuantLinear layers, keyed by qualified name inside the unet."""
        return {n: m for n, m in self.unet.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}

    def attention_processors(self) -> dict[str, QuantAttnProcessor]:
        return {n: m for n, m in self.unet.named_modules() if isinstance(m, QuantAttnProcessor)}

    def spec(self, meta: dict | None = None):
        """The ``QuantSpec`` describing this model (see ``quant/spec.py``)."""
        from .spec import spec_from_model

        return spec_from_model(self, meta=meta)

    @contextlib.contextmanager
    def quant_enabled(self, flag: bool = True) -> Iterator["QuantizedUNet"]:
        """Temporarily enable / disable every quantizer; ``quant_enabled(False)`` runs exactly as the FP model."""
        qs = list(self.quantizers().values())
        saved = [q.enabled for q in qs]
        try:
            for q in qs:
                q.enabled = bool(flag)
            yield self
        finally:
            for q, s in zip(qs, saved):
                q.enabled = s

    @contextlib.contextmanager
    def observing(self) -> Iterator["QuantizedUNet"]:
        """Activation quantizers record statistics and pass data through unchanged."""
        saved = [q.observing for q in self._act]
        try:
            for q in self._act:
                q.observing = True
            yield self
        finally:
            for q, s in zip(self._act, saved):
                q.observing = s

    # -- calibration -------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weight_scales(self, method: str | None = None) -> None:
        """Initialise every weight quantizer from its layer's current weight (``QuantConfig.weight_init``)."""
        method = method or self.quant_config.weight_init
        for layer in self.quant_layers().values():
            if layer.weight_quantizer is not None:
                layer.weight_quantizer.init_from(layer.weight, method=method)

    @torch.no_grad()
    def calibrate_activations(
        self,
        batches: Iterable,
        init_weights: bool = True,
        weight_method: str | None = None,
        observer: str | None = None,
        percentile: float | None = None,
        momentum: float | None = None,
    ) -> dict:
        """PTQ initialisation from an iterable of ``(sample, timestep, cond)`` batches (``cond`` may be None).

        Weight scales first (so activations downstream see quantized weights), then one observing
        forward per batch, then per-group activation scales. Groups never visited copy the nearest
        visited group. Returns ``{"batches": n, "groups_seen": [...], "groups_filled": [...]}``.
        """
        cfg = self.quant_config
        if init_weights:
            self.init_weight_scales(weight_method)
        shifted = [q for q in self._act if q.shifts is not None]
        if shifted:  # channel shifts first: the scales are then observed on the shifted values
            batches = list(batches)
            if batches:
                self._observe_ranges(batches, shifted)
        for q in self._act:
            q.reset_observations()
            q.set_observer(
                observer or (cfg.act_observer_4bit if q.bits == 4 else cfg.act_observer),
                cfg.act_percentile if percentile is None else percentile,
                cfg.act_momentum if momentum is None else momentum,
            )
        n, seen = self._observe(batches)
        if n == 0:
            raise CalibrationError("calibrate_activations got no batches", hint="pass at least one (sample, t, cond) batch")
        filled = set()
        for q in self._act:
            filled.update(q.init_scales())
        return {"batches": n, "groups_seen": sorted(seen), "groups_filled": sorted(filled)}

    def _observe(self, batches: Iterable) -> tuple[int, set[int]]:
        """One observing forward per ``(sample, timestep, cond)`` batch: (batches run, groups visited)."""
        n, seen = 0, set()
        with self.observing():
            for batch in batches:
                sample, timestep, cond = (tuple(batch) + (None,))[:3]
                self(sample, timestep, cond)
                seen.add(self._group)
                n += 1
        return n, seen

    @torch.no_grad()
    def _observe_ranges(self, batches: list, shifted: list[ActQuantizer]) -> None:
        for q in self._act:
            q.range_pass = True
        try:
            self._observe(batches)
        finally:
            for q in self._act:
                q.range_pass = False
        for q in shifted:
            q.init_shifts()


# --------------------------------------------------------------------------------------------------
# entry point


def quantize_unet(unet: nn.Module, config: QuantConfig | None = None, *, inplace: bool = False) -> QuantizedUNet:
    """Wrap ``unet`` with fake-quantizers following ``config``; returns a ``QuantizedUNet``.

    ``inplace=False`` (default) deep-copies the unet first, so the FP model stays usable as the teacher.
    Scales start at 1: run ``calibrate_activations`` (or load a checkpoint) before use.
    Every decision that deviates from the config (float layers, per-block fallbacks) is recorded in
    ``QuantizedUNet.notes`` and in the spec.
    """
    config = config or QuantConfig()
    config.validate()
    if not inplace:
        unet = copy.deepcopy(unet)
    device = next(unet.parameters()).device
    bins = config.bins
    G = bins.num_groups
    notes: dict[str, str] = {}
    per_block = config.weight_granularity == "per_block"

    targets = [(n, m) for n, m in unet.named_modules() if type(m) in _LAYER_TYPES]
    for name, mod in targets:
        pat = matches_any(name, config.skip) or matches_any(name, config.keep_float)
        if pat is not None:
            notes[name] = f"float (matches {pat!r})"
            continue
        eight = matches_any(name, config.weight_8bit) if config.w_bits == 4 else None
        gran, why = weight_granularity_for(tuple(mod.weight.shape), per_block and not eight, config.block_size)
        wq = WeightQuantizer(tuple(mod.weight.shape), 8 if eight else config.w_bits, gran)
        if eight:
            notes[f"{name}.weight_quantizer"] = f"8-bit weights (matches {eight!r})"
        elif why:
            notes[f"{name}.weight_quantizer"] = why
        iq = None
        if config.a_bits is not None:
            bits = 8 if matches_any(name, config.act_8bit) else config.a_bits
            shift = config.channel_shift and bits == 4 and smoothable(name, mod, config.smooth_layers)
            iq = ActQuantizer(
                G, bits, signed=True, observer=config.act_observer, percentile=config.act_percentile,
                momentum=config.act_momentum, shift_channels=mod.weight.shape[1] if shift else 0,
                shift_axis=1 if isinstance(mod, nn.Conv2d) else -1,
            )
        _LAYER_TYPES[type(mod)].from_float(mod, wq, iq)
        if config.smooth_alpha is not None and smoothable(name, mod, config.smooth_layers):
            mod.register_buffer("input_smooth", torch.ones(mod.weight.shape[1]))  # set by apply_smoothing

    attn_bits = config.effective_attn_bits
    for name, mod in [(n, m) for n, m in unet.named_modules() if _is_attention(m)]:
        if not config.quantize_attention or attn_bits is None:
            continue
        pat = matches_any(name, config.skip) or matches_any(name, config.keep_float)
        if pat is not None:
            notes[f"{name}.processor"] = f"float attention (matches {pat!r})"
            continue
        fallback = mod.processor
        proc = QuantAttnProcessor(G, attn_bits, config.probs_bits, fallback=fallback, name=f"{name}.processor",
                                  probs_signed=config.target == "trt")
        for q in proc.quantizers().values():
            q.set_observer(config.act_observer, config.act_percentile, config.act_momentum)
        mod.set_processor(proc)

    for n, m in unet.named_modules():
        if isinstance(m, (WeightQuantizer, ActQuantizer, QuantAttnProcessor)):
            m.name = n
    unet.to(device)  # the new quantizer parameters start on the CPU; keep them beside the weights
    return QuantizedUNet(unet, config, notes)
