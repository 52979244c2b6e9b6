"""Build a TensorRT engine from an ONNX file with the ``tensorrt`` Python API (TensorRT 10.x and 11.x).

TensorRT is imported lazily, inside functions: importing questdeploy never needs it. What the build does:

1. ``Builder`` + network (strongly typed: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` on 10.x, where it
   is a flag; TensorRT 11 is always strongly typed and deprecates the flag), ``OnnxParser.parse_from_file``
   (external weights found beside the file). Every parser error is reported in full (node, operator, code).
2. ``IBuilderConfig``: one optimization profile (min/opt/max per dynamic input, from ``profiles.shape_ranges``),
   ``builder_optimization_level``, workspace pool limit, timing cache loaded from and merged back into a
   file, optional ``REFIT`` / ``REFIT_IDENTICAL`` / ``STRIP_PLAN``; ``FP16`` only for the weakly typed FP16
   baseline on TensorRT 10. Progress through ``IProgressMonitor`` when TensorRT has it, else a spinner.
3. ``build_serialized_network`` -> plan written atomically (temp file + rename).

``trtexec_command`` / ``polygraphy_convert_command`` give the same build as command lines, for rebuilding by
hand; they need no TensorRT and are what the stage writes beside the plan.
"""

from __future__ import annotations

from ..runfolder import write_bytes_atomic

import ctypes
import importlib
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import EngineBuildError, NoCudaDeviceError, ProfileError, TensorRTNotInstalledError
from .graph import io_signature, load_model
from .profiles import BuildProfile, shape_ranges

INSTALL_HINT = (
    "install NVIDIA TensorRT's Python package `tensorrt` on a machine with an NVIDIA CUDA GPU "
    "(`pip install questdeploy[gpu]` pulls `tensorrt`); `questdeploy build-engine --check-only` "
    "lints the ONNX without TensorRT"
)


# --------------------------------------------------------------------------------------------------
# environment


def import_tensorrt():
    """``import tensorrt`` or a ``TensorRTNotInstalledError`` that says what to install."""
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as e:  # ImportError, or the PyPI placeholder failing at import / missing libnvinfer
        raise TensorRTNotInstalledError(
            f"TensorRT is not available: `import tensorrt` failed ({type(e).__name__}: {e}). "
            "Building an engine needs TensorRT and a CUDA GPU.",
            hint=INSTALL_HINT,
        ) from e
    if not hasattr(trt, "Builder"):
        raise TensorRTNotInstalledError(
            f"the installed `tensorrt` module ({getattr(trt, '__file__', '?')}) has no Builder: it is a placeholder "
            "package without the TensorRT libraries.", hint=INSTALL_HINT)
    return trt


def tensorrt_version() -> str | None:
    try:
        return import_tensorrt().__version__
    except TensorRTNotInstalledError:
        return None


def trt_major(trt) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        return 0


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    compute_capability: str  # "8.9"

    @property
    def sm(self) -> str:
        return self.compute_capability.replace(".", "")


def cuda_devices() -> list[CudaDevice]:
    """CUDA devices from the driver API (libcuda), falling back to torch; [] when there is no CUDA."""
    devs = _cuda_devices_driver()
    if devs is not None:
        return devs
    try:
        import torch

        if torch.cuda.is_available():
            return [CudaDevice(i, torch.cuda.get_device_name(i), "%d.%d" % torch.cuda.get_device_capability(i))
                    for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    return []


def _cuda_devices_driver() -> list[CudaDevice] | None:
    lib = None
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return None
    try:
        if lib.cuInit(0) != 0:
            return []
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return []
        out = []
        for i in range(count.value):
            dev = ctypes.c_int(0)
            lib.cuDeviceGet(ctypes.byref(dev), i)
            buf = ctypes.create_string_buffer(256)
            lib.cuDeviceGetName(buf, 256, dev)
            major, minor = ctypes.c_int(0), ctypes.c_int(0)
            lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
            lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
            out.append(CudaDevice(i, buf.value.decode(errors="replace"), f"{major.value}.{minor.value}"))
        return out
    except Exception:
        return None


def require_cuda_device(index: int = 0) -> CudaDevice:
    devs = cuda_devices()
    if not devs:
        raise NoCudaDeviceError(
            "no CUDA device is visible (no NVIDIA driver / GPU, or CUDA_VISIBLE_DEVICES hides it): "
            "TensorRT builds engines for the GPU it runs on.",
            hint="run build-engine on the machine (same GPU model) that will serve the engine; "
                 "`--check-only` works without a GPU",
        )
    if index >= len(devs):
        raise NoCudaDeviceError(f"CUDA device {index} requested, {len(devs)} visible", hint="pick --device 0..%d" % (len(devs) - 1))
    return devs[index]


# --------------------------------------------------------------------------------------------------
# build options


@dataclass
class BuildOptions:
    """Everything one build needs; ``from_profile`` fills it from a ``BuildProfile`` and the ONNX."""

    onnx_path: Path
    plan_path: Path
    shapes: dict  # {input: (min, opt, max)} for dynamic inputs
    strongly_typed: bool = True
    fp16: bool = False  # weak-typing FP16 baseline (TensorRT 10 only)
    optimization_level: int = 3
    workspace_mib: int = 4096
    timing_cache: Path | None = None
    refit: str = "none"  # "none" | "refit" | "identical"
    strip_weights: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_profile(cls, onnx_path, plan_path, profile: BuildProfile, *, timing_cache: Path | None = None,
                     progress: bool = True) -> "BuildOptions":
        model = load_model(onnx_path)
        inputs, _ = io_signature(model)
        return cls(
            onnx_path=Path(onnx_path), plan_path=Path(plan_path), shapes=shape_ranges(inputs, profile),
            strongly_typed=profile.typing == "strong", fp16=profile.typing == "weak-fp16",
            optimization_level=profile.optimization_level, workspace_mib=profile.workspace_mib,
            timing_cache=timing_cache, refit=profile.refit, strip_weights=profile.strip_weights, progress=progress,
        )

    def flags(self) -> dict:
        return {
            "strongly_typed": self.strongly_typed, "fp16": self.fp16, "optimization_level": self.optimization_level,
            "workspace_mib": self.workspace_mib, "timing_cache": str(self.timing_cache) if self.timing_cache else None,
            "refit": self.refit, "strip_weights": self.strip_weights,
            "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()},
        }


# --------------------------------------------------------------------------------------------------
# command lines (no TensorRT needed)


def _shape_str(shape, sep="x") -> str:
    return sep.join(str(int(d)) for d in shape) if len(shape) else ""


def trtexec_command(opts: BuildOptions, trtexec: str = "trtexec") -> list[str]:
    """The trtexec command line that builds the same engine."""
    cmd = [trtexec, f"--onnx={opts.onnx_path}"]
    if opts.strongly_typed:
        cmd.append("--stronglyTyped")
    if opts.fp16:
        cmd.append("--fp16")
    if opts.shapes:
        for flag, i in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            cmd.append(flag + "=" + ",".join(f"{name}:{_shape_str(r[i])}" for name, r in opts.shapes.items()))
    cmd.append(f"--builderOptimizationLevel={opts.optimization_level}")
    cmd.append(f"--memPoolSize=workspace:{opts.workspace_mib}M")
    if opts.timing_cache:
        cmd.append(f"--timingCacheFile={opts.timing_cache}")
    if opts.refit == "refit":
        cmd.append("--refit")
    if opts.strip_weights:
        cmd.append("--stripWeights")
    cmd += [f"--saveEngine={opts.plan_path}", "--skipInference"]
    return cmd


def polygraphy_convert_command(opts: BuildOptions) -> list[str]:
    """The ``polygraphy convert`` command line that builds the same engine."""
    cmd = ["polygraphy", "convert", str(opts.onnx_path), "--convert-to", "trt", "-o", str(opts.plan_path)]
    if opts.strongly_typed:
        cmd.append("--strongly-typed")
    if opts.fp16:
        cmd.append("--fp16")
    for flag, i in (("--trt-min-shapes", 0), ("--trt-opt-shapes", 1), ("--trt-max-shapes", 2)):
        if opts.shapes:
            cmd.append(flag)
            cmd += [f"{name}:[{_shape_str(r[i], ',')}]" for name, r in opts.shapes.items()]
    cmd += ["--builder-optimization-level", str(opts.optimization_level)]
    cmd += ["--pool-limit", f"workspace:{opts.workspace_mib}M"]
    if opts.timing_cache:
        cmd += ["--load-timing-cache", str(opts.timing_cache), "--save-timing-cache", str(opts.timing_cache)]
    if opts.refit == "refit" or opts.strip_weights:
        cmd.append("--refittable")
    if opts.strip_weights:
        cmd.append("--strip-plan")
    return cmd


def command_line(cmd: list[str]) -> str:
    return shlex.join(cmd)


# --------------------------------------------------------------------------------------------------
# progress


class _Spinner:
    """Fallback progress (TensorRT without IProgressMonitor): elapsed time on one line of stderr."""

    def __init__(self, label: str, stream=None):
        self.label, self.stream = label, stream or sys.stderr
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        start, chars, i = time.time(), "|/-\\", 0
        while not self._stop.wait(0.5):
            self.stream.write(f"\r{self.label} {chars[i % 4]} {time.time() - start:6.1f} s")
            self.stream.flush()
            i += 1

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.stream.write("\n")


def make_progress_monitor(trt, log: Callable[[str], None]):
    """An ``IProgressMonitor`` printing each top-level phase and step, or None if TensorRT lacks it."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class _Monitor(base):
        def __init__(self):
            base.__init__(self)
            self._lock = threading.Lock()
            self._steps: dict[str, int] = {}
            self._parents: dict[str, str | None] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                self._steps[phase_name] = num_steps
                self._parents[phase_name] = parent_phase
                depth = 0
                p = parent_phase
                while p and depth < 8:
                    depth += 1
                    p = self._parents.get(p)
                if depth <= 1:
                    log(f"{'  ' * depth}[build] {phase_name} ({num_steps} step(s))")

        def step_complete(self, phase_name, step):
            with self._lock:
                if self._parents.get(phase_name) is None and self._steps.get(phase_name, 0) > 1:
                    log(f"[build] {phase_name}: {step + 1}/{self._steps[phase_name]}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            with self._lock:
                self._steps.pop(phase_name, None)

    return _Monitor()


# --------------------------------------------------------------------------------------------------
# the build


def _logger(trt, verbose: bool):
    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
                print(f"[TensorRT] ERROR: {msg}", file=sys.stderr)
            elif severity == trt.ILogger.Severity.WARNING or verbose:
                print(f"[TensorRT] {severity.name if hasattr(severity, 'name') else severity}: {msg}", file=sys.stderr)

    return _Logger()


def _parser_errors(parser) -> list[str]:
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        parts = [str(e.desc()) if hasattr(e, "desc") else str(e)]
        for attr, label in (("node_name", "node"), ("node_operator", "op"), ("node", "node index"), ("code", "code"),
                            ("file", "file"), ("line", "line"), ("func", "in")):
            fn = getattr(e, attr, None)
            try:
                v = fn() if callable(fn) else None
            except Exception:
                v = None
            if v not in (None, "", -1):
                parts.append(f"{label}={v}")
        out.append("; ".join(parts))
    return out


def _set_flag(trt, config, name: str):
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}",
                               hint="use a TensorRT version that supports it, or drop the option from the profile")
    config.set_flag(flag)


def build_engine(opts: BuildOptions, *, device: int = 0, verbose: bool = False,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Build ``opts.onnx_path`` into ``opts.plan_path``; returns build info (TensorRT version, GPU, seconds, flags).

    Raises ``TensorRTNotInstalledError`` / ``NoCudaDeviceError`` before touching the ONNX, and
    ``EngineBuildError`` with every parser/builder error when the build fails.
    """
    trt = import_tensorrt()
    dev = require_cuda_device(device)
    major = trt_major(trt)
    logger = _logger(trt, verbose)
    builder = trt.Builder(logger)
    flags = 0
    if opts.strongly_typed and major < 11:
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if flag is None:
            raise EngineBuildError(f"TensorRT {trt.__version__} cannot build strongly typed networks",
                                   hint="use TensorRT >= 9.1 (10.x recommended) for Q/DQ engines")
        flags |= 1 << int(flag)
    if opts.fp16 and major >= 11:
        raise EngineBuildError(
            f"TensorRT {trt.__version__} has no weak typing, so the FP16 flag cannot turn an FP32 ONNX into FP16",
            hint="convert the ONNX to FP16 first (`polygraphy convert --fp-to-fp16 model.onnx -o model_fp16.onnx`) "
                 "and build it with typing = \"strong\"")
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    log(f"[build] parsing {opts.onnx_path}")
    ok = parser.parse_from_file(str(opts.onnx_path))
    errs = _parser_errors(parser)
    if not ok or errs:
        raise EngineBuildError(
            f"TensorRT's ONNX parser rejected {opts.onnx_path} ({len(errs)} error(s)):\n  " + "\n  ".join(errs or logger.errors or ["(no detail)"]),
            hint="run `questdeploy build-engine --check-only` for the TensorRT rule lint; "
                 "the errors above name the node and operator")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_mib) << 20)
    try:
        config.builder_optimization_level = int(opts.optimization_level)
    except AttributeError:
        log("[build] this TensorRT has no builder_optimization_level; using its default")
    if opts.fp16:
        _set_flag(trt, config, "FP16")
    if opts.refit == "refit":
        _set_flag(trt, config, "REFIT")
    elif opts.refit == "identical" or (opts.strip_weights and opts.refit == "none"):
        _set_flag(trt, config, "REFIT_IDENTICAL")
    if opts.strip_weights:
        _set_flag(trt, config, "STRIP_PLAN")

    if opts.shapes:
        profile = builder.create_optimization_profile()
        names = {network.get_input(i).name for i in range(network.num_inputs)}
        for name, (mn, op, mx) in opts.shapes.items():
            if name not in names:
                raise EngineBuildError(f"profile names input '{name}', the network has {sorted(names)}",
                                       hint="the ONNX changed since the shapes were computed; rebuild the options")
            profile.set_shape(name, tuple(mn), tuple(op), tuple(mx))
        if config.add_optimization_profile(profile) < 0:
            raise EngineBuildError("TensorRT rejected the optimization profile: " + "; ".join(logger.errors[-3:]),
                                   hint="check --batch / --dim ranges against the ONNX dims")

    cache = None
    if opts.timing_cache is not None:
        data = b""
        if opts.timing_cache.is_file():
            data = opts.timing_cache.read_bytes()
            log(f"[build] timing cache: {opts.timing_cache} ({len(data)} bytes)")
        try:
            cache = config.create_timing_cache(data)
        except Exception:
            cache = None
        # a cache from another TensorRT version or GPU is refused (ignore_mismatch=False): start empty then
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            log(f"[build] timing cache {opts.timing_cache} does not match this TensorRT/GPU; starting an empty one")
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, ignore_mismatch=False)

    monitor = make_progress_monitor(trt, log) if opts.progress else None
    if monitor is not None:
        config.progress_monitor = monitor
    log(f"[build] building on {dev.name} (sm {dev.compute_capability}) with TensorRT {trt.__version__}")
    start = time.time()
    if monitor is None and opts.progress:
        with _Spinner("[build] building engine"):
            plan = builder.build_serialized_network(network, config)
    else:
        plan = builder.build_serialized_network(network, config)
    seconds = time.time() - start
    if plan is None:
        raise EngineBuildError(
            "TensorRT's builder failed:\n  " + "\n  ".join(logger.errors or ["(no error message; rerun with verbose=True)"]),
            hint="lint with `--check-only`; a larger workspace or a lower optimization level can also help")
    write_bytes_atomic(opts.plan_path, memoryview(plan))
    if cache is not None and opts.timing_cache is not None:
        write_bytes_atomic(opts.timing_cache, memoryview(config.get_timing_cache().serialize()))
    log(f"[build] wrote {opts.plan_path} ({opts.plan_path.stat().st_size / 2**20:.1f} MiB) in {seconds:.1f} s")
    return {
        "tensorrt_version": trt.__version__, "gpu": dev.name, "compute_capability": dev.compute_capability,
        "build_seconds": round(seconds, 2), "flags": opts.flags(), "parser_warnings": len(logger.errors),
    }


def check_shapes_buildable(opts: BuildOptions) -> None:
    """Cheap sanity checks on a ``BuildOptions`` (no TensorRT): shapes are ordered."""
    for name, (mn, op, mx) in opts.shapes.items():
        if not (len(mn) == len(op) == len(mx)) or any(not (a <= b <= c) for a, b, c in zip(mn, op, mx)):
            raise ProfileError(f"shape range for '{name}' is not ordered: {mn} / {op} / {mx}",
                               hint="min <= opt <= max in every dim")
