"""TensorRT for RTX through onnxruntime's plugin execution-provider API (``onnxruntime-ep-nv-tensorrt-rtx-cu12``).

The closest real TensorRT that installs from PyPI: the wheel carries ``libtensorrt_rtx`` and the EP library,
registered at run time with ``onnxruntime.register_execution_provider_library``. Used by
``engines/rtx_ep_check.py`` and the GPU tests; see engines/README.md for what it accepted on which GPU.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from .errors import NoCudaDeviceError, TensorRTNotInstalledError

# Compute capabilities TensorRT-RTX supports on Linux (its 1.0-1.5 support matrices): GeForce / RTX PRO parts
# from Turing on. Data-center Ampere (8.0) and Hopper (9.0: H100, H200) are not among them; on an H200 the EP
# registers and then offers no device (measured, engines/README.md).
RTX_COMPUTE_CAPABILITIES = ((7, 5), (8, 6), (8, 9), (12, 0), (12, 1))


def register_rtx_ep(ort) -> tuple[str, list]:
    """Register the TensorRT-RTX EP with ``ort`` once; return its name and the EP devices it supports here.

    The wheel ships ``libcudart.so.12.x`` without the ``libcudart.so.12`` link the EP library asks for, and a
    machine whose CUDA runtime is 13 has none; loading the bundled file first (RTLD_GLOBAL) satisfies it by
    its SONAME, as the package itself does for ``libtensorrt_rtx``.
    """
    try:
        import onnxruntime_ep_nv_tensorrt_rtx as rtx
    except ImportError as e:
        raise TensorRTNotInstalledError(
            f"the TensorRT-RTX EP is not installed ({e}).",
            hint="pip install onnxruntime-ep-nv-tensorrt-rtx-cu12 on a machine with an NVIDIA GPU") from None
    name = rtx.get_ep_name()
    if not any(d.ep_name == name for d in ort.get_ep_devices()):
        for cudart in sorted(Path(rtx.get_library_path()).parent.glob("libcudart.so.12*")):
            ctypes.CDLL(str(cudart), mode=ctypes.RTLD_GLOBAL)
        try:
            ort.register_execution_provider_library(name, rtx.get_library_path())
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail type
            raise NoCudaDeviceError(f"onnxruntime could not load the TensorRT-RTX EP: {e}",
                                    hint="it needs an NVIDIA driver (libcuda.so.1) and onnxruntime >= 1.23") from None
    return name, [d for d in ort.get_ep_devices() if d.ep_name == name]


def why_no_rtx_device() -> str:
    """One line on why the EP offers no device: the GPU's compute capability against the supported ones."""
    supported = ", ".join(f"{a}.{b}" for a, b in RTX_COMPUTE_CAPABILITIES)
    try:
        import torch

        if torch.cuda.is_available():
            cc = torch.cuda.get_device_capability(0)
            name = torch.cuda.get_device_name(0)
            if cc not in RTX_COMPUTE_CAPABILITIES:
                return (f"{name} has compute capability {cc[0]}.{cc[1]}; TensorRT-RTX supports {supported} "
                        "(GeForce / RTX PRO GPUs). Use full TensorRT (questdeploy build-engine) on this GPU.")
            return (f"{name} (compute capability {cc[0]}.{cc[1]}) is supported by TensorRT-RTX, but onnxruntime "
                    "discovered no GPU: its Linux device discovery needs /sys/class/drm/cardN (see engines/gpu_session.sh).")
    except Exception:  # noqa: BLE001 - a diagnosis must not fail
        pass
    return f"no supported GPU found; TensorRT-RTX supports compute capability {supported}."
