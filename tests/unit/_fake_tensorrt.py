"""A stand-in for the ``tensorrt`` module with the API surface ``questdeploy.engine.builder`` uses.

It records every call so CPU tests can check the build plumbing (strong typing, profile shapes, flags,
timing cache, progress monitor, parser error reporting, atomic plan write) without TensorRT. It checks
nothing about TensorRT's semantics: the GPU tests do that.
"""

from __future__ import annotations

import enum
import json
import types

import onnx


def make(version: str = "10.8.0.43", parser_errors: list[str] | None = None, build_fails: bool = False):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    calls: dict = {"flags": [], "pool": {}, "profiles": [], "timing_cache_in": None, "network_flags": None}
    trt.calls = calls

    class _Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        Severity = _Severity

        def __init__(self):
            pass

    class Logger(ILogger):
        WARNING = _Severity.WARNING

        def __init__(self, *a):
            pass

    trt.ILogger, trt.Logger = ILogger, Logger
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", REFIT="REFIT", REFIT_IDENTICAL="REFIT_IDENTICAL", STRIP_PLAN="STRIP_PLAN")

    class IProgressMonitor:
        def __init__(self):
            pass

    trt.IProgressMonitor = IProgressMonitor

    class Tensor:
        def __init__(self, name):
            self.name = name

    class Network:
        def __init__(self, flags):
            self.inputs = []
            calls["network_flags"] = flags

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class ParserError:
        def __init__(self, msg):
            self.msg = msg

        def desc(self):
            return self.msg

        def node_name(self):
            return "bad_node"

        def node_operator(self):
            return "Conv"

        def code(self):
            return 8

    class OnnxParser:
        def __init__(self, network, logger):
            self.network = network
            self.errors = [ParserError(m) for m in (parser_errors or [])]

        def parse_from_file(self, path):
            m = onnx.load(path)
            inits = {t.name for t in m.graph.initializer}
            self.network.inputs = [Tensor(i.name) for i in m.graph.input if i.name not in inits]
            calls["parsed"] = path
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, mn, op, mx):
            self.shapes[name] = (mn, op, mx)

    class Cache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+entries"

    class Config:
        def __init__(self):
            self.builder_optimization_level = 3
            self.progress_monitor = None
            self._cache = None

        def set_memory_pool_limit(self, pool, size):
            calls["pool"][pool] = size

        def set_flag(self, f):
            calls["flags"].append(f)

        def add_optimization_profile(self, p):
            calls["profiles"].append(p.shapes)
            return 0

        def create_timing_cache(self, data):
            calls["timing_cache_in"] = bytes(data)
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self._cache = cache
            return True

        def get_timing_cache(self):
            return self._cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls["opt_level"] = config.builder_optimization_level
            mon = config.progress_monitor
            if mon is not None:
                mon.phase_start("Building", None, 2)
                mon.step_complete("Building", 0)
                mon.step_complete("Building", 1)
                mon.phase_finish("Building")
                calls["progress"] = True
            if build_fails:
                self.logger.log(_Severity.ERROR, "no implementation for layer bad_node")
                return None
            return b"FAKEPLAN" + json.dumps(sorted(map(str, calls["flags"]))).encode()

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt
