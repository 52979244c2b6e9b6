"""The quantization spec (``quant_spec.json``) and the checkpoint folder.

Why: export, verify and engine building must consume a finetuned model without re-running anything
and without guessing. The spec states, per quantizer, what is quantized and how (bits, signedness,
granularity, axis, block size, scale shape, the per-timestep-group activation scale table), plus the
timestep bins and the ``QuantConfig`` that rebuilds the module structure. It is versioned and validated
on construction (torchao style): a spec written today loads next year or fails with a fix-it message.

Checkpoint folder = ``quant_spec.json`` + ``model.safetensors`` (state dict of the ``QuantizedUNet``:
float weights + quantizer scales), written atomically (temp dir + rename).
"""

from __future__ import annotations

from ..runfolder import atomic_dir

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from torch import nn

from .errors import QuantError, SpecError, SpecMismatchError
from .primitives import TimestepBins, granularity_from_dict
from .quantizers import WeightQuantizer
from .wrap import QuantConfig, QuantizedUNet, quantize_unet

__all__ = [
    "SPEC_VERSION",
    "SPEC_FILE",
    "WEIGHTS_FILE",
    "QuantizerSpec",
    "QuantSpec",
    "spec_from_model",
    "check_matches",
    "save_checkpoint",
    "load_checkpoint",
]

SPEC_VERSION = 1
SPEC_FILE = "quant_spec.json"
WEIGHTS_FILE = "model.safetensors"

_ROLES = {
    "weight_quantizer": "weight",
    "input_quantizer": "input",
    "processor.q_quantizer": "attn_q",
    "processor.k_quantizer": "attn_k",
    "processor.probs_quantizer": "attn_probs",
    "processor.v_quantizer": "attn_v",
}


def _from_dict(cls, d: dict, what: str):
    """Build a dataclass from a dict, failing clearly on missing or unknown keys."""
    if not isinstance(d, dict):
        raise SpecError(f"{what} must be a JSON object, got {type(d).__name__}", hint="regenerate the spec")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise SpecError(
            f"{what} has unknown keys {unknown}",
            hint="this spec was probably written by a newer questdeploy; upgrade questdeploy to read it",
        )
    try:
        return cls(**d)
    except TypeError as e:
        raise SpecError(f"{what} is incomplete: {e}", hint="regenerate the spec with QuantizedUNet.spec()") from e


@dataclass
class QuantizerSpec:
    """One quantizer: where it sits (``layer``, ``role``) and how it quantizes."""

    name: str
    kind: str  # "weight" | "activation"
    bits: int
    signed: bool
    granularity: str  # "per_tensor" | "per_channel" | "per_block"
    axis: int | None
    block_size: int | None
    shape: list[int]  # shape of the scale (weights) / of the scale table (activations: [G])
    layer: str = ""
    role: str = ""  # weight | input | attn_q | attn_k | attn_probs | attn_v
    scales: list[float] | None = None  # activation scale table, one per timestep group
    enabled: bool = True
    note: str = ""
    shift_channels: int = 0  # activations: per-group channel shifts (a (G, C) table in model.safetensors); 0 = none
    shift_axis: int | None = None  # the input's channel axis the shifts run along

    def __post_init__(self):
        where = f"quantizer {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise SpecError("quantizer name must be a non-empty string", hint="use the module's qualified name")
        if self.kind not in ("weight", "activation"):
            raise SpecError(f"{where}: kind={self.kind!r}", hint="kind is 'weight' or 'activation'")
        allowed = (4, 8) if self.kind == "weight" else (4, 8, 16)
        if isinstance(self.bits, bool) or self.bits not in allowed:
            raise SpecError(f"{where}: bits={self.bits!r} unsupported", hint=f"use one of {list(allowed)}")
        try:
            granularity_from_dict({"granularity": self.granularity, "axis": self.axis, "block_size": self.block_size})
        except (QuantError, KeyError, TypeError) as e:
            raise SpecError(f"{where}: bad granularity ({e})", hint="per_channel needs axis; per_block axis + block_size") from e
        self.shape = [int(s) for s in self.shape]
        if self.kind == "weight":
            if not self.signed:
                raise SpecError(f"{where}: weights are symmetric signed", hint="set signed=true")
            if self.granularity == "per_tensor":
                raise SpecError(f"{where}: weights are per_channel or per_block", hint="set granularity accordingly")
            if self.scales is not None:
                raise SpecError(f"{where}: weight scales live in model.safetensors", hint="set scales to null")
            if self.shift_channels:
                raise SpecError(f"{where}: channel shifts belong to activation quantizers", hint="set shift_channels to 0")
        else:
            if self.granularity != "per_tensor":
                raise SpecError(
                    f"{where}: activations are per_tensor (TensorRT rejects per-channel activation Q/DQ)",
                    hint="set granularity='per_tensor'",
                )
            if self.scales is None or len(self.scales) != (self.shape[0] if self.shape else -1):
                raise SpecError(
                    f"{where}: the activation scale table must have shape[0]={self.shape} entries",
                    hint="write one scale per timestep group",
                )
            if isinstance(self.shift_channels, bool) or not isinstance(self.shift_channels, int) or self.shift_channels < 0:
                raise SpecError(f"{where}: shift_channels={self.shift_channels!r}", hint="a channel count, 0 for no shift")
            if self.shift_channels and not isinstance(self.shift_axis, int):
                raise SpecError(f"{where}: channel shifts need shift_axis", hint="1 for a conv input, -1 for a linear one")
            self.scales = [float(s) for s in self.scales]
            if not all(math.isfinite(s) and s > 0 for s in self.scales):
                raise SpecError(f"{where}: scales must be finite and > 0, got {self.scales}", hint="re-run calibration")


@dataclass(kw_only=True)
class QuantSpec:
    """Everything export needs to know about a quantized UNet (JSON round-trip, versioned)."""

    version: int = SPEC_VERSION
    w_bits: int
    a_bits: int | None
    method: str
    target: str
    timestep_edges: list[float]
    config: dict
    quantizers: list[QuantizerSpec]
    float_layers: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise SpecError(f"spec version={self.version!r} is invalid", hint="the version is a positive integer")
        if self.version > SPEC_VERSION:
            raise SpecError(
                f"spec version {self.version} is newer than this questdeploy supports ({SPEC_VERSION})",
                hint="upgrade questdeploy to read this checkpoint",
            )
        if isinstance(self.config, QuantConfig):
            self.config = self.config.to_dict()
        self.quantizers = [
            q if isinstance(q, QuantizerSpec) else _from_dict(QuantizerSpec, q, "quantizer entry") for q in self.quantizers
        ]
        try:
            cfg = QuantConfig.from_dict(dict(self.config))
            bins = TimestepBins(tuple(self.timestep_edges))
        except QuantError as e:
            raise SpecError(f"invalid spec: {e.message}", hint=e.hint) from e
        self.timestep_edges = list(bins.edges)
        if list(cfg.bins.edges) != self.timestep_edges:
            raise SpecError(
                "timestep_edges disagree with the config's bins", hint="write the spec with QuantizedUNet.spec()"
            )
        if (self.w_bits, self.a_bits) != (cfg.w_bits, cfg.a_bits):
            raise SpecError(
                f"w_bits/a_bits ({self.w_bits}/{self.a_bits}) disagree with the config ({cfg.w_bits}/{cfg.a_bits})",
                hint="write the spec with QuantizedUNet.spec()",
            )
        names = [q.name for q in self.quantizers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SpecError(f"duplicate quantizer names {dup[:5]}", hint="each quantizer appears once")
        G = bins.num_groups
        bad = [q.name for q in self.quantizers if q.kind == "activation" and q.shape != [G]]
        if bad:
            raise SpecError(
                f"activation scale tables must have {G} rows (one per timestep group); wrong: {bad[:5]}",
                hint="timestep_edges and the scale tables must come from the same model",
            )

    @property
    def bins(self) -> TimestepBins:
        return TimestepBins(tuple(self.timestep_edges))

    def quant_config(self) -> QuantConfig:
        return QuantConfig.from_dict(dict(self.config))

    def by_name(self) -> dict[str, QuantizerSpec]:
        return {q.name: q for q in self.quantizers}

    # -- JSON --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        return _from_dict(cls, d, "quant spec")

    @classmethod
    def from_json(cls, text: str) -> "QuantSpec":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"quant spec is not valid JSON: {e}", hint="the file is corrupt; re-run the stage that wrote it") from e
        return cls.from_dict(d)

    def save(self, path) -> Path:
        """Atomic write (temp file in the same folder + ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_json())
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path) -> "QuantSpec":
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"no quant spec at {path}", hint="point to a checkpoint folder written by the finetune stage")
        return cls.from_json(path.read_text())

    def check_matches(self, qunet: QuantizedUNet) -> None:
        check_matches(self, qunet)


# --------------------------------------------------------------------------------------------------
# model <-> spec


def _layer_role(name: str) -> tuple[str, str]:
    for suffix, role in _ROLES.items():
        if name.endswith("." + suffix) or name == suffix:
            return name[: -len(suffix)].rstrip("."), role
    return "", ""


def _entry(name: str, q: nn.Module, note: str = "") -> QuantizerSpec:
    layer, role = _layer_role(name)
    g = q.granularity.to_dict()
    if isinstance(q, WeightQuantizer):
        return QuantizerSpec(
            name=name, kind="weight", bits=q.bits, signed=True, shape=list(q.scale.shape), layer=layer, role=role,
            scales=None, enabled=q.enabled, note=note, **g,
        )
    return QuantizerSpec(
        name=name, kind="activation", bits=q.bits, signed=q.signed, shape=[q.num_groups], layer=layer, role=role,
        scales=[float(s) for s in q.scales.detach().float().cpu()], enabled=q.enabled, note=note, **g,
        shift_channels=0 if q.shifts is None else int(q.shifts.shape[1]),
        shift_axis=None if q.shifts is None else q.shift_axis,
    )


def spec_from_model(qunet: QuantizedUNet, meta: dict | None = None) -> QuantSpec:
    """Describe ``qunet`` (used by ``QuantizedUNet.spec()``)."""
    float_layers = [n for n, m in qunet.unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    entries = [_entry(n, q, qunet.notes.get(n, "")) for n, q in qunet.quantizers().items()]
    cfg = qunet.quant_config
    return QuantSpec(
        version=SPEC_VERSION,
        w_bits=cfg.w_bits,
        a_bits=cfg.a_bits,
        method=qunet.method,
        target=qunet.target,
        timestep_edges=list(qunet.bins.edges),
        config=cfg.to_dict(),
        quantizers=entries,
        float_layers=float_layers,
        meta=dict(meta or {}),
    )


_STRUCT_FIELDS = ("kind", "bits", "signed", "granularity", "axis", "block_size", "shape", "layer", "role",
                  "shift_channels", "shift_axis")


def check_matches(spec: QuantSpec, qunet: QuantizedUNet) -> None:
    """Raise ``SpecMismatchError`` if ``spec`` does not describe ``qunet``'s quantizers (names, layout, shapes)."""
    have = spec_from_model(qunet).by_name()
    want = spec.by_name()
    problems = []
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing:
        problems.append(f"{len(missing)} quantizer(s) in the spec but not in the model, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} quantizer(s) in the model but not in the spec, e.g. {extra[:3]}")
    for name in sorted(set(want) & set(have)):
        a, b = want[name], have[name]
        diffs = [f"{f}: spec {getattr(a, f)!r} vs model {getattr(b, f)!r}" for f in _STRUCT_FIELDS if getattr(a, f) != getattr(b, f)]
        if diffs:
            problems.append(f"{name}: " + "; ".join(diffs))
    if list(spec.timestep_edges) != list(qunet.bins.edges):
        problems.append(f"timestep edges: spec {spec.timestep_edges} vs model {list(qunet.bins.edges)}")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise SpecMismatchError(
            "quantization spec does not match the model:\n  " + "\n  ".join(shown),
            hint="load the checkpoint onto the same base UNet it was made from (same model config), "
            "or rebuild the model with quantize_unet(unet, spec.quant_config())",
        )


# --------------------------------------------------------------------------------------------------
# checkpoint folder


def save_checkpoint(qunet: QuantizedUNet, folder, extra_meta: dict | None = None) -> Path:
    """Write ``quant_spec.json`` + ``model.safetensors`` into ``folder`` atomically (temp dir + rename).

    An existing folder is replaced only after the new one is complete.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        spec = qunet.spec(meta=extra_meta)
        spec.save(tmp / SPEC_FILE)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in qunet.state_dict().items()}
        # one metadata key only: safetensors writes a multi-key metadata map in hash order, which would make
        # the bytes (and the checkpoint hash the run manifest records) differ between identical runs
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def load_checkpoint(unet_fp: nn.Module, folder, *, inplace: bool = False) -> QuantizedUNet:
    """Rebuild the ``QuantizedUNet`` from ``folder``'s spec on top of ``unet_fp``, then load its state dict."""
    from safetensors.torch import load_file

    folder = Path(folder)
    spec = QuantSpec.load(folder / SPEC_FILE)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise SpecError(f"no {WEIGHTS_FILE} in {folder}", hint="the checkpoint is incomplete; re-run the finetune stage")
    qunet = quantize_unet(unet_fp, spec.quant_config(), inplace=inplace)
    qunet.method, qunet.target = spec.method, spec.target
    check_matches(spec, qunet)
    state = load_file(str(weights))
    try:
        result = qunet.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise SpecMismatchError(
            f"{WEIGHTS_FILE} does not fit the model: {str(e).splitlines()[-1].strip()}",
            hint="load the checkpoint onto the same base UNet architecture it was made from",
        ) from e
    if result.missing_keys or result.unexpected_keys:
        raise SpecMismatchError(
            f"{WEIGHTS_FILE} does not fit the model: missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}",
            hint="load the checkpoint onto the same base UNet architecture it was made from",
        )
    enabled = {q.name: q.enabled for q in spec.quantizers}
    for name, q in qunet.quantizers().items():
        q.enabled = enabled.get(name, True)
    return qunet
