"""A Triton Inference Server model repository for a TensorRT plan: ``<model>/config.pbtxt`` + ``<model>/1/model.plan``.

Batching choice (written as a comment into the config): Triton's ``max_batch_size > 0`` means "every input
and output has a leading batch dim that is *not* listed in ``dims``, and Triton may concatenate requests
along it". questdeploy's exports feed ``timestep`` as its own length-n tensor of which the graph reads
element 0 (all batch elements share one timestep, which also selects the scale group). If Triton
concatenated two requests at different timesteps, the second would silently run at the first's timestep.
So for such engines the config uses ``max_batch_size: 0`` with the batch dim written out as ``-1`` in
``dims`` (explicit-batch engine with a dynamic batch range from its optimization profile) and no dynamic
batcher: a client sends whole batches. Only a graph whose every input and output is batch-major with one
shared batch symbol (``timestep`` included) gets ``max_batch_size = max batch`` and ``dynamic_batching``.

``parse_config_pbtxt`` checks a config with protobuf's own text-format parser against a subset of Triton's
``ModelConfig`` schema built here (field names, types and enum values as in Triton's model_config.proto),
so an unknown field, a wrong enum name or a syntax error fails loudly.
"""

from __future__ import annotations

import json

from ..runfolder import atomic_dir

import shutil
from pathlib import Path

from .errors import EngineError

TRITON_TYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64",
    "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64", "float16": "TYPE_FP16",
    "float32": "TYPE_FP32", "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16",
}


def _triton_type(dtype: str) -> str:
    try:
        return TRITON_TYPES[dtype]
    except KeyError:
        raise EngineError(f"tensor type {dtype!r} has no Triton equivalent", hint="export with float32/float16 I/O") from None


def batching_mode(manifest: dict) -> str:
    """"dynamic" when requests can be concatenated along dim 0 of every tensor, else "none" (see module doc)."""
    onnx_d = manifest["onnx"]
    tensors = onnx_d["inputs"] + onnx_d["outputs"]
    firsts = set()
    for t in tensors:
        dims = t["dims"]
        if not dims or isinstance(dims[0], int) and dims[0] > 0:
            return "none"
        firsts.add(dims[0])
    # one shared *named* batch symbol on every tensor (the exporter writes -1 only when the name is unknown)
    if len(firsts) != 1 or -1 in firsts:
        return "none"
    groups = (onnx_d.get("timestep_groups") or {}).get("num_groups") or 0
    return "none" if groups > 1 else "dynamic"


def _dims_text(dims) -> str:
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]"


def _raw_dims(t: dict) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else -1 for d in t["dims"]]


def triton_config(model_name: str, manifest: dict, *, batching: str = "auto", instance_count: int = 1) -> str:
    """The ``config.pbtxt`` text for the plan described by ``manifest``."""
    mode = batching_mode(manifest) if batching == "auto" else batching
    if mode not in ("none", "dynamic"):
        raise EngineError(f"batching {batching!r}", hint="use auto, none or dynamic")
    onnx_d = manifest["onnx"]
    prof = (manifest.get("shape_profiles") or [{}])[0]
    max_batch = 0
    lines = [f'name: "{model_name}"', 'platform: "tensorrt_plan"', 'default_model_filename: "model.plan"']
    if mode == "dynamic":
        maxes = [r["max"][0] for r in prof.values() if r.get("max")]
        mins = [r["min"][0] for r in prof.values() if r.get("min")]
        if not maxes or min(mins) != 1:
            raise EngineError("dynamic batching needs an engine whose batch range starts at 1",
                              hint="rebuild with --batch 1:OPT:MAX, or use batching none")
        max_batch = min(maxes)
        lines += [
            "# Every input and output is batch-major with one batch symbol, and the graph has no per-timestep",
            "# scale groups: Triton may concatenate requests along dim 0 (dims below exclude it).",
            f"max_batch_size: {max_batch}",
        ]
    else:
        lines += [
            "# max_batch_size 0: an explicit-batch TensorRT engine whose batch range comes from its optimization",
            "# profile (the -1 dims below). Requests are not concatenated by Triton because all batch elements of a",
            "# call share one timestep (the graph reads timestep[0], which also picks the per-timestep scale group);",
            "# merging requests at different timesteps would silently run them at the wrong one. Send whole batches.",
            "max_batch_size: 0",
        ]

    def tensor_block(kind: str, t: dict) -> list[str]:
        dims = _raw_dims(t)
        if mode == "dynamic":
            dims = dims[1:]
        out = ["  {", f'    name: "{t["name"]}"', f"    data_type: {_triton_type(t['dtype'])}"]
        if not dims:  # Triton needs rank >= 1: a scalar travels as [1] and is reshaped to []
            out += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
        else:
            out.append(f"    dims: {_dims_text(dims)}")
        out.append("  }")
        return out

    for kind, key in (("input", "inputs"), ("output", "outputs")):
        blocks = [tensor_block(kind, t) for t in onnx_d[key]]
        lines.append(f"{kind} [")
        for i, b in enumerate(blocks):
            if i < len(blocks) - 1:
                b[-1] = "  },"
            lines += b
        lines.append("]")
    lines += ["instance_group [", "  {", f"    count: {int(instance_count)}", "    kind: KIND_GPU", "  }", "]"]
    if mode == "dynamic":
        lines += ["dynamic_batching {", "  max_queue_delay_microseconds: 100", "}"]
    return "\n".join(lines) + "\n"


def write_triton_repo(repo_dir: str | Path, model_name: str, onnx_path: str | Path | None, plan_path: str | Path,
                      manifest: dict, *, batching: str = "auto", version: int = 1) -> Path:
    """Write ``<repo_dir>/<model_name>/config.pbtxt`` and ``<model_name>/<version>/model.plan`` (+ engine.json).

    ``onnx_path`` is only used to cross-check that the manifest describes it (same sha256) when given.
    The model folder is replaced atomically. Returns the model folder.
    """
    from ..runfolder import sha256_file

    if not model_name or "/" in model_name or model_name.startswith("."):
        raise EngineError(f"model name {model_name!r} is not a folder name", hint="use e.g. --triton-model quest_unet")
    if onnx_path is not None and manifest.get("onnx", {}).get("sha256") not in (None, sha256_file(Path(onnx_path))):
        raise EngineError(f"the manifest was not built from {onnx_path} (sha256 differs)", hint="pass the ONNX the plan was built from")
    text = triton_config(model_name, manifest, batching=batching)
    parse_config_pbtxt(text)  # never write a config Triton would refuse to parse
    repo = Path(repo_dir)
    repo.mkdir(parents=True, exist_ok=True)
    with atomic_dir(repo / model_name) as tmp:
        (tmp / str(version)).mkdir()
        shutil.copyfile(plan_path, tmp / str(version) / "model.plan")
        (tmp / "config.pbtxt").write_text(text)
        (tmp / str(version) / "engine.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return repo / model_name


# --------------------------------------------------------------------------------------------------
# a strict parser: protobuf text format against a subset of Triton's ModelConfig schema

_MSG_CLASS = None


def _model_config_class():
    global _MSG_CLASS
    if _MSG_CLASS is not None:
        return _MSG_CLASS
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="questdeploy_triton_subset.proto", package="qdtriton", syntax="proto3")

    def enum(name, values):
        e = fdp.enum_type.add(name=name)
        for n, v in values:
            e.value.add(name=n, number=v)

    enum("DataType", [(n, i) for i, n in enumerate(
        ["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8", "TYPE_INT16",
         "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING", "TYPE_BF16"])])
    enum("Kind", [("KIND_AUTO", 0), ("KIND_GPU", 1), ("KIND_CPU", 2), ("KIND_MODEL", 3)])
    enum("Format", [("FORMAT_NONE", 0), ("FORMAT_NHWC", 1), ("FORMAT_NCHW", 2)])

    def msg(name, fields):
        m = fdp.message_type.add(name=name)
        for fname, num, ftype, label, tname in fields:
            f = m.field.add(name=fname, number=num, type=ftype, label=label)
            if tname:
                f.type_name = f".qdtriton.{tname}"

    O, R = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    msg("Reshape", [("shape", 1, F.TYPE_INT64, R, None)])
    msg("ModelInput", [("name", 1, F.TYPE_STRING, O, None), ("data_type", 2, F.TYPE_ENUM, O, "DataType"),
                       ("format", 3, F.TYPE_ENUM, O, "Format"), ("dims", 4, F.TYPE_INT64, R, None),
                       ("reshape", 5, F.TYPE_MESSAGE, O, "Reshape"), ("is_shape_tensor", 6, F.TYPE_BOOL, O, None),
                       ("allow_ragged_batch", 7, F.TYPE_BOOL, O, None), ("optional", 8, F.TYPE_BOOL, O, None)])
    msg("ModelOutput", [("name", 1, F.TYPE_STRING, O, None), ("data_type", 2, F.TYPE_ENUM, O, "DataType"),
                        ("dims", 3, F.TYPE_INT64, R, None), ("label_filename", 4, F.TYPE_STRING, O, None),
                        ("reshape", 5, F.TYPE_MESSAGE, O, "Reshape"), ("is_shape_tensor", 6, F.TYPE_BOOL, O, None)])
    msg("DynamicBatching", [("preferred_batch_size", 1, F.TYPE_INT32, R, None),
                            ("max_queue_delay_microseconds", 2, F.TYPE_UINT64, O, None),
                            ("preserve_ordering", 3, F.TYPE_BOOL, O, None)])
    msg("InstanceGroup", [("name", 1, F.TYPE_STRING, O, None), ("count", 2, F.TYPE_INT32, O, None),
                          ("gpus", 3, F.TYPE_INT32, R, None), ("kind", 4, F.TYPE_ENUM, O, "Kind")])
    msg("ModelConfig", [("name", 1, F.TYPE_STRING, O, None), ("platform", 2, F.TYPE_STRING, O, None),
                        ("max_batch_size", 4, F.TYPE_INT32, O, None), ("input", 5, F.TYPE_MESSAGE, R, "ModelInput"),
                        ("output", 6, F.TYPE_MESSAGE, R, "ModelOutput"),
                        ("instance_group", 7, F.TYPE_MESSAGE, R, "InstanceGroup"),
                        ("default_model_filename", 8, F.TYPE_STRING, O, None),
                        ("dynamic_batching", 11, F.TYPE_MESSAGE, O, "DynamicBatching"),
                        ("backend", 17, F.TYPE_STRING, O, None)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    _MSG_CLASS = message_factory.GetMessageClass(pool.FindMessageTypeByName("qdtriton.ModelConfig"))
    return _MSG_CLASS


def parse_config_pbtxt(text: str) -> dict:
    """Parse a config.pbtxt strictly; returns it as a dict (field names as written, enums as names).

    Raises ``EngineError`` on a syntax error, an unknown field or a bad enum value, and on the rules Triton
    itself enforces for these fields (name/platform present, every tensor named and typed, dims rank >= 1).
    """
    from google.protobuf import json_format, text_format

    cls = _model_config_class()
    msg = cls()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as e:
        raise EngineError(f"config.pbtxt does not parse: {e}", hint="this is a bug in the writer; report it") from e
    d = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    problems = []
    if not d.get("name"):
        problems.append("no name")
    if d.get("platform") != "tensorrt_plan" and d.get("backend") != "tensorrt":
        problems.append("platform is not tensorrt_plan")
    for kind in ("input", "output"):
        if not d.get(kind):
            problems.append(f"no {kind}")
        for t in d.get(kind, []):
            if not t.get("name") or t.get("data_type", "TYPE_INVALID") == "TYPE_INVALID":
                problems.append(f"{kind} {t.get('name', '?')} lacks a name or data_type")
            if not t.get("dims"):
                problems.append(f"{kind} {t.get('name', '?')} has no dims (Triton needs rank >= 1)")
    if int(d.get("max_batch_size", 0)) == 0 and "dynamic_batching" in d:
        problems.append("dynamic_batching with max_batch_size 0")
    if problems:
        raise EngineError("config.pbtxt is not a valid Triton config: " + "; ".join(problems), hint="regenerate it")
    for kind in ("input", "output"):
        for t in d.get(kind, []):
            t["dims"] = [int(x) for x in t.get("dims", [])]
    d["max_batch_size"] = int(d.get("max_batch_size", 0))
    return d
