"""Small native kernels (``csrc/quant.c``) built at first use with the machine's C compiler.

The library is compiled once per source version and CPU into a cache directory
(``$BITSMITH_CACHE`` or ``~/.cache/bitsmith``) and loaded with ctypes; torch tensors are passed by
pointer. Where no compiler is found, or ``BITSMITH_NATIVE=0``, callers fall back to eager torch ops
and ``available()`` says so (``bitsmith inspect`` reports it).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["available", "quantize_per_token_u8", "quantize_static_u8", "quantize_static_channel_u8", "scale_rows_add_bias"]

_SOURCE = Path(__file__).parent / "csrc" / "quant.c"
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]


def _cache_dir() -> Path:
    root = os.environ.get("BITSMITH_CACHE") or Path.home() / ".cache" / "bitsmith"
    return Path(root) / "kernels"


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, "-o", tmp, str(_SOURCE)], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)  # atomic: concurrent builders never see half a library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("BITSMITH_NATIVE", "1") == "0":
        return None
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode() + platform.machine().encode())
    target = _cache_dir() / f"quant-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.bitsmith_quantize_per_token_u8.argtypes = [ptr, i64, i64, ptr, ptr, ctypes.c_int]
    lib.bitsmith_scale_rows_add_bias.argtypes = [ptr, i64, i64, ptr, ptr, ctypes.c_int]
    lib.bitsmith_quantize_static_u8.argtypes = [ptr, i64, ctypes.c_float, ctypes.c_int32, ptr, ctypes.c_int]
    lib.bitsmith_quantize_static_channel_u8.argtypes = [ptr, i64, i64, ptr, ctypes.c_int32, ptr, ctypes.c_int]
    return lib


def available() -> bool:
    return _library() is not None


def quantize_per_token_u8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float32 contiguous -> (codes (M, K) uint8 with zero point 128, scale (M, 1) float32)."""
    rows, cols = x.shape
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scale = torch.empty(rows, 1, dtype=torch.float32)
    _library().bitsmith_quantize_per_token_u8(
        x.data_ptr(), rows, cols, codes.data_ptr(), scale.data_ptr(), torch.get_num_threads()
    )
    return codes, scale


def scale_rows_add_bias(out: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """In place on ``out`` (M, N) float32: ``out * scale[:, None] + bias``."""
    rows, cols = out.shape
    bias_ptr = None if bias is None else bias.data_ptr()
    _library().bitsmith_scale_rows_add_bias(
        out.data_ptr(), rows, cols, scale.data_ptr(), bias_ptr, torch.get_num_threads()
    )
    return out


def quantize_static_u8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """x float32 contiguous (any shape) -> uint8 codes ``clamp(round(x / scale) + zero_point, 0, 255)``."""
    codes = torch.empty(x.shape, dtype=torch.uint8, memory_format=_memory_format(x))
    _library().bitsmith_quantize_static_u8(
        x.data_ptr(), x.numel(), 1.0 / scale, zero_point, codes.data_ptr(), torch.get_num_threads()
    )
    return codes


def quantize_static_channel_u8(x: torch.Tensor, multiplier: torch.Tensor, zero_point: int) -> torch.Tensor:
    """x (M, K) float32 contiguous, multiplier (K,) float32 -> codes ``clamp(round(x * multiplier) + zp, 0, 255)``."""
    rows, cols = x.shape
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    multiplier = multiplier.float().contiguous()
    _library().bitsmith_quantize_static_channel_u8(
        x.data_ptr(), rows, cols, multiplier.data_ptr(), zero_point, codes.data_ptr(), torch.get_num_threads()
    )
    return codes


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
