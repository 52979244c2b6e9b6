"""Engine build profiles (``engines/*.toml``) and the shape ranges they turn into.

A profile says what ONNX it expects (form, weight/activation bits), how to type the network, and how to
build: batch ``min:opt:max``, ranges for other dynamic dims, builder optimization level, workspace,
timing cache, refit / weight stripping. ``--batch`` and ``--dim NAME=min:opt:max`` override it.
``shape_ranges`` turns a profile plus the ONNX inputs into one (min, opt, max) shape per input: the
optimization profile for TensorRT and the ``--minShapes/--optShapes/--maxShapes`` of trtexec.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ProfileError
from .graph import TensorSig

PROFILE_NAMES = ("int8", "int4", "fp16")
TYPINGS = ("strong", "weak-fp16")
REFIT_MODES = ("none", "refit", "identical")


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not (1 <= self.min <= self.opt <= self.max):
            raise ProfileError(
                f"range {self.min}:{self.opt}:{self.max} is not ordered",
                hint="give min:opt:max with 1 <= min <= opt <= max, e.g. 1:4:8",
            )

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


def parse_range(text: str | int, what: str = "--batch") -> DimRange:
    """``"1:4:8"`` -> DimRange(1, 4, 8); ``"4"`` or ``4`` -> DimRange(4, 4, 4)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return DimRange(text, text, text)
    s = str(text).strip()
    parts = s.split(":")
    if len(parts) not in (1, 3) or not all(re.fullmatch(r"\d+", p.strip()) for p in parts):
        raise ProfileError(
            f"{what} {s!r} is not min:opt:max",
            hint=f"write {what} as three positive integers, e.g. {what} 1:4:8 (or one integer for a fixed size)",
        )
    vals = [int(p) for p in parts] * (3 if len(parts) == 1 else 1)
    if vals[0] < 1:
        raise ProfileError(f"{what} {s!r}: sizes must be >= 1", hint=f"e.g. {what} 1:4:8")
    if not (vals[0] <= vals[1] <= vals[2]):
        raise ProfileError(f"{what} {s!r}: need min <= opt <= max", hint=f"e.g. {what} {min(vals)}:{sorted(vals)[1]}:{max(vals)}")
    return DimRange(*vals)


def parse_dim_overrides(items) -> dict[str, DimRange]:
    """``["sequence=1:4:77", ...]`` (the repeatable ``--dim`` option) -> {"sequence": DimRange}."""
    out: dict[str, DimRange] = {}
    for item in items or ():
        if "=" not in item:
            raise ProfileError(f"--dim {item!r} is not NAME=min:opt:max", hint="e.g. --dim sequence=1:4:77")
        name, rng = item.split("=", 1)
        out[name.strip()] = parse_range(rng, f"--dim {name.strip()}")
    return out


@dataclass(frozen=True)
class BuildProfile:
    name: str
    description: str = ""
    # what the ONNX must be
    form: str = "trt"  # "trt" (constant Q/DQ scales) or "fp" (float graph)
    weight_bits: int | None = 8  # None: float weights
    act_bits: int | None = 8  # None: float activations
    # how to type the network: "strong" = types from the ONNX (required for Q/DQ; TensorRT 11 has only this);
    # "weak-fp16" = TensorRT 10 weak typing with the FP16 flag (the FP16 baseline from an FP32 ONNX)
    typing: str = "strong"
    # build
    batch: DimRange = DimRange(1, 1, 4)
    dims: dict[str, DimRange] = field(default_factory=dict)
    optimization_level: int = 3
    workspace_mib: int = 4096
    timing_cache: str | None = "{cache_dir}/timing-trt{trt_version}-sm{sm}.cache"
    refit: str = "none"  # "none" | "refit" | "identical"
    strip_weights: bool = False
    source: str | None = None

    def __post_init__(self):
        if self.form not in ("trt", "fp"):
            raise ProfileError(f"profile {self.name}: form {self.form!r} cannot be built by TensorRT",
                               hint="use form = \"trt\" (Q/DQ with constant scales) or \"fp\" (float graph)")
        for key, bits in (("weight_bits", self.weight_bits), ("act_bits", self.act_bits)):
            if bits not in (None, 4, 8):
                raise ProfileError(f"profile {self.name}: {key} = {bits!r}", hint="use 4, 8, or leave it out for float")
        if self.act_bits == 4:
            raise ProfileError(f"profile {self.name}: act_bits = 4, but TensorRT has no INT4 activations",
                               hint="use act_bits = 8 (W4A8) or leave activations float (W4A16)")
        if self.typing not in TYPINGS:
            raise ProfileError(f"profile {self.name}: typing {self.typing!r}", hint=f"use one of {', '.join(TYPINGS)}")
        if self.typing == "weak-fp16" and (self.weight_bits or self.act_bits):
            raise ProfileError(f"profile {self.name}: weak typing with Q/DQ",
                               hint="quantized profiles must use typing = \"strong\" (TensorRT's explicit quantization)")
        if not 0 <= self.optimization_level <= 5:
            raise ProfileError(f"profile {self.name}: optimization_level {self.optimization_level}", hint="use 0..5 (TensorRT default 3)")
        if self.workspace_mib < 1:
            raise ProfileError(f"profile {self.name}: workspace_mib {self.workspace_mib}", hint="give the workspace in MiB, e.g. 4096")
        if self.refit not in REFIT_MODES:
            raise ProfileError(f"profile {self.name}: refit {self.refit!r}", hint=f"use one of {', '.join(REFIT_MODES)}")

    def with_overrides(self, batch: DimRange | str | None = None, dims: dict | None = None, **kw) -> "BuildProfile":
        changes = {k: v for k, v in kw.items() if v is not None}
        if batch is not None:
            changes["batch"] = batch if isinstance(batch, DimRange) else parse_range(batch)
        if dims:
            changes["dims"] = {**self.dims, **dims}
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["batch"] = str(self.batch)
        d["dims"] = {k: str(v) for k, v in self.dims.items()}
        return d

    def timing_cache_path(self, trt_version: str = "unknown", sm: str = "unknown") -> Path | None:
        if not self.timing_cache:
            return None
        cache_dir = os.environ.get("QUESTDEPLOY_CACHE") or str(Path.home() / ".cache" / "questdeploy")
        return Path(self.timing_cache.format(cache_dir=cache_dir, trt_version=trt_version, sm=sm)).expanduser()


_KNOWN = {
    "name", "description", "onnx", "build", "dims",
}
_ONNX_KEYS = {"form", "weight_bits", "act_bits"}
_BUILD_KEYS = {"typing", "batch", "optimization_level", "workspace_mib", "timing_cache", "refit", "strip_weights"}


def profiles_dir() -> Path:
    """``engines/`` of the source tree (the profiles ship beside the package)."""
    env = os.environ.get("QUESTDEPLOY_ENGINES_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "engines"


def load_profile(name_or_path: str | Path) -> BuildProfile:
    """A profile by name (``int8``, ``int4``, ``fp16`` from ``engines/``) or by path to a TOML file."""
    p = Path(name_or_path)
    if p.suffix != ".toml":
        p = profiles_dir() / f"{name_or_path}.toml"
    if not p.is_file():
        known = sorted(x.stem for x in profiles_dir().glob("*.toml")) if profiles_dir().is_dir() else list(PROFILE_NAMES)
        raise ProfileError(f"no build profile {str(name_or_path)!r} (looked for {p})",
                           hint=f"use one of {', '.join(known)} or a path to a .toml file")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{p}: not valid TOML ({e})", hint="fix the file; see engines/README.md for the keys") from e
    return profile_from_dict(data, source=str(p), default_name=p.stem)


def profile_from_dict(data: dict, source: str | None = None, default_name: str = "custom") -> BuildProfile:
    where = source or "profile"
    unknown = set(data) - _KNOWN
    onnx_t, build_t, dims_t = data.get("onnx", {}), data.get("build", {}), data.get("dims", {})
    unknown |= {f"onnx.{k}" for k in set(onnx_t) - _ONNX_KEYS} | {f"build.{k}" for k in set(build_t) - _BUILD_KEYS}
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}",
                           hint=f"known: [onnx] {', '.join(sorted(_ONNX_KEYS))}; [build] {', '.join(sorted(_BUILD_KEYS))}; [dims] NAME = \"min:opt:max\"")
    kw: dict = {"name": data.get("name", default_name), "description": data.get("description", ""), "source": source}
    for k in _ONNX_KEYS:
        if k in onnx_t:
            kw[k] = onnx_t[k]
    for k in ("weight_bits", "act_bits"):
        if kw.get(k) == 0:
            kw[k] = None  # TOML has no null: 0 means float
    for k in _BUILD_KEYS - {"batch"}:
        if k in build_t:
            kw[k] = build_t[k]
    if kw.get("timing_cache") == "":
        kw["timing_cache"] = None
    if isinstance(kw.get("refit"), bool):
        kw["refit"] = "refit" if kw["refit"] else "none"
    if "batch" in build_t:
        kw["batch"] = parse_range(build_t["batch"], f"{where} [build] batch")
    kw["dims"] = {k: parse_range(v, f"{where} [dims] {k}") for k, v in dims_t.items()}
    try:
        return BuildProfile(**kw)
    except TypeError as e:
        raise ProfileError(f"{where}: {e}", hint="see engines/README.md for the profile keys") from e


# --------------------------------------------------------------------------------------------------
# shapes

BATCH_INPUTS = ("sample", "encoder_hidden_states")
TIMESTEP_INPUT = "timestep"


def shape_ranges(inputs: list[TensorSig], profile: BuildProfile) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape for each input that has a dynamic dim (static inputs need no profile entry).

    Which range a dynamic dim takes: the batch range for dim 0 of ``sample``/``encoder_hidden_states`` and for
    any dim sharing their symbolic name; ``timestep``'s length (one value or one per batch element) gets
    1 : opt batch : max batch; any other dim takes ``profile.dims[<symbolic name>]`` (``--dim NAME=...``).
    """
    by_name = {s.name: s for s in inputs}
    batch_syms = {s.dims[0] for n in BATCH_INPUTS if (s := by_name.get(n)) is not None and s.dims and isinstance(s.dims[0], str)}
    b = profile.batch
    out = {}
    for sig in inputs:
        if not sig.dynamic:
            continue
        mins, opts, maxs = [], [], []
        for i, d in enumerate(sig.dims):
            if isinstance(d, int):
                r = (d, d, d)
            elif (d is not None and d in batch_syms) or (i == 0 and sig.name in BATCH_INPUTS):
                r = (b.min, b.opt, b.max)
            elif sig.name == TIMESTEP_INPUT and i == 0:
                r = (1, b.opt, b.max)
            else:
                key = d if d else f"{sig.name}:{i}"
                rng = profile.dims.get(key) or profile.dims.get(f"{sig.name}:{i}")
                if rng is None:
                    raise ProfileError(
                        f"input '{sig.name}' dim {i} ({key!r}) is dynamic and has no range",
                        hint=f"give one with --dim {key}=min:opt:max (or a [dims] entry in the profile)",
                    )
                r = (rng.min, rng.opt, rng.max)
            mins.append(r[0]); opts.append(r[1]); maxs.append(r[2])  # noqa: E702
        out[sig.name] = (tuple(mins), tuple(opts), tuple(maxs))
    return out
