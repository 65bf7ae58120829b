"""Run ONNX models with onnxruntime: on CUDA where a GPU is present, on the CPU otherwise.

``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` as available even on a
machine without a GPU, and asking for it there prints a burst of provider
errors before falling back.  So CUDA is requested only when the CUDA driver
reports a device, and onnxruntime's own logging is limited to errors.
"""

from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np

from hpa.errors import LoadError

_ERROR_ONLY = 3  # onnxruntime log severity: 0 verbose ... 3 error, 4 fatal


@lru_cache(maxsize=1)
def cuda_device_present() -> bool:
    """True when the CUDA driver loads and sees at least one device (no torch import needed)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            driver = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        try:
            return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
        except AttributeError:
            return False
    return False


def providers(device: str = "auto") -> list[str]:
    """Execution providers for ``device``: "auto" (CUDA when present), "cuda" or "cpu"."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    want_cuda = device == "cuda" or (device == "auto" and cuda_device_present())
    if want_cuda and "CUDAExecutionProvider" in available:
        _preload_cuda_libraries(ort)
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@lru_cache(maxsize=1)
def _preload_cuda_libraries(ort: Any) -> None:
    """Load CUDA and cuDNN from the nvidia-* wheels (installed with torch) so the CUDA provider finds them."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception:  # noqa: BLE001 - then onnxruntime searches the system paths itself
            pass


def session(path: str | os.PathLike, device: str = "auto") -> Any:
    """An ``onnxruntime.InferenceSession`` for the model at ``path``, quiet unless something fails."""
    import onnxruntime as ort

    ort.set_default_logger_severity(_ERROR_ONLY)
    options = ort.SessionOptions()
    options.log_severity_level = _ERROR_ONLY
    try:
        return ort.InferenceSession(os.fspath(path), sess_options=options, providers=providers(device))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LoadError(f"onnxruntime cannot run {os.fspath(path)}: {first}") from None


def run_onnx(path: str | os.PathLike, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray,
             device: str = "auto") -> list[np.ndarray]:
    """Run the model at ``path`` once; returns its outputs in the model's order.

    ``inputs`` is a name -> array mapping, or arrays in the order of the
    model's inputs (a single array for a one-input model).
    """
    sess = session(path, device)
    names = [i.name for i in sess.get_inputs()]
    if isinstance(inputs, np.ndarray):
        inputs = [inputs]
    if not isinstance(inputs, Mapping):
        if len(inputs) != len(names):
            raise LoadError(f"the model takes {len(names)} inputs ({', '.join(names)}), not {len(inputs)}")
        inputs = dict(zip(names, inputs))
    return list(sess.run(None, {k: np.asarray(v) for k, v in inputs.items()}))
