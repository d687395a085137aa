"""Small native kernels (``csrc/quant.c``) built at first use with the machine's C compiler.

The library is compiled with ``-march=native`` into a cache directory (``$BITSMITH_CACHE`` or
``~/.cache/bitsmith``) under a name keyed by the source, the compiler and its flags, and the CPU's
instruction-set flags (a cache shared between machines never hands an AVX512 build to an AVX2 CPU). Beside
it a ``.sha256`` file records the build's checksum; a cached library whose bytes do not match, or whose ABI
number differs from this module's, is rebuilt before anything loads it. Torch tensors are passed by pointer.

Where the library cannot be had, callers fall back to eager torch ops, and ``status()`` says why: disabled
by ``BITSMITH_NATIVE=0``, no C compiler, or the compiler's own first error line.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from bitsmith.nn import cpu

__all__ = [
    "available",
    "status",
    "quantize_per_token_u8",
    "quantize_per_token_split_u8",
    "quantize_static_u8",
    "quantize_static_channel_u8",
    "quantize_static_split_u8",
    "scale_rows_add_bias",
    "dequantize_packed",
    "int4_matmul",
    "INT4_MAX_ROWS",
    "Weight",
    "library",
]

_SOURCE = Path(__file__).parent / "csrc" / "quant.c"
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
ABI = 5  # must equal bitsmith_native_abi() in csrc/quant.c

_status = "not loaded yet"


def _cache_dir() -> Path:
    root = os.environ.get("BITSMITH_CACHE") or Path.home() / ".cache" / "bitsmith"
    return Path(root) / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.cache
def _compiler_identity(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
        return done.stdout.splitlines()[0] if done.stdout else compiler
    except (OSError, subprocess.SubprocessError):
        return compiler


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _target(compiler: str) -> Path:
    key = hashlib.sha256(_SOURCE.read_bytes())
    for part in (" ".join(_FLAGS), _compiler_identity(compiler), cpu.machine_key()):
        key.update(b"\0" + part.encode())
    return _cache_dir() / f"quant-{key.hexdigest()[:16]}.so"


class BuildError(OSError):
    """The compiler failed; the message is its first error line."""


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            lines = [ln for ln in (done.stderr or done.stdout).splitlines() if "error" in ln.lower()]
            first = (lines or (done.stderr or done.stdout or f"exit status {done.returncode}").splitlines() or ["?"])[0]
            raise BuildError(f"{Path(compiler).name} failed: {first.strip()}")
        os.chmod(tmp, 0o755)
        Path(tmp + ".sha256").write_text(_sha256(Path(tmp)) + "\n")
        os.replace(tmp + ".sha256", str(target) + ".sha256")
        os.replace(tmp, target)  # atomic: concurrent builders never see half a library
    finally:
        for leftover in (tmp, tmp + ".sha256"):
            if os.path.exists(leftover):
                os.unlink(leftover)


def _verified(target: Path) -> bool:
    """The cached build is whole: its checksum matches the one written beside it at build time."""
    try:
        return target.exists() and _sha256(target) == (Path(str(target) + ".sha256").read_text().strip())
    except OSError:
        return False


def _declare(lib: ctypes.CDLL) -> None:
    i64, i32, ptr, f32, num = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    lib.bitsmith_quantize_per_token_u8.argtypes = [ptr, i64, i64, ptr, ptr, num]
    lib.bitsmith_quantize_per_token_split_u8.argtypes = [ptr, i64, i64, ptr, ptr, num]
    lib.bitsmith_scale_rows_add_bias.argtypes = [ptr, i64, i64, ptr, ptr, num]
    lib.bitsmith_quantize_static_u8.argtypes = [ptr, i64, f32, i32, ptr, num]
    lib.bitsmith_quantize_static_channel_u8.argtypes = [ptr, i64, i64, ptr, i32, ptr, num]
    lib.bitsmith_quantize_static_split_u8.argtypes = [ptr, i64, i64, i64, ptr, f32, i32, ptr, num]
    lib.bitsmith_dequantize_packed.argtypes = [ptr, i64, num, i64, i64, i64, ptr, ptr, ptr, num]
    lib.bitsmith_int4_matmul.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, num]
    lib.bitsmith_matvec.argtypes = [ptr, ptr, ptr, num, num]
    lib.bitsmith_matvec.restype = num
    lib.bitsmith_llama_block.argtypes = [ptr, i64, ptr, ptr, f32, ptr, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64,
                                         num, num]
    lib.bitsmith_llama_block.restype = num
    lib.bitsmith_native_abi.restype = num


@functools.cache
def _library() -> ctypes.CDLL | None:
    global _status
    if os.environ.get("BITSMITH_NATIVE", "1") == "0":
        _status = "disabled by BITSMITH_NATIVE=0"
        return None
    compiler = _compiler()
    if compiler is None:
        _status = "no C compiler found (set CC, or install cc/gcc)"
        return None
    target = _target(compiler)
    try:
        for attempt in range(2):
            if not _verified(target):
                _build(compiler, target)
            lib = ctypes.CDLL(str(target))
            if lib.bitsmith_native_abi() == ABI:
                break
            target.unlink()  # a stale build under a colliding name: rebuild it once
        else:
            raise OSError(f"the built library reports ABI {lib.bitsmith_native_abi()}, expected {ABI}")
        _declare(lib)
    except BuildError as err:
        _status = f"build failed: {err}"
        return None
    except (OSError, subprocess.SubprocessError, AttributeError) as err:
        _status = f"cannot build or load {target.name}: {err}"
        return None
    _status = f"built with {_compiler_identity(compiler)} ({target.name})"
    return lib


class Weight(ctypes.Structure):
    """``bitsmith_weight`` in csrc/quant.c: one matrix of a decode step, int4 packed (kind 0) or float32 (kind 1).
    It holds pointers only: whoever makes one keeps its tensors alive."""

    _fields_ = [("kind", ctypes.c_int32), ("group", ctypes.c_int32), ("rows", ctypes.c_int64),
                ("cols", ctypes.c_int64), ("packed", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("zero", ctypes.c_void_p), ("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("minimum", ctypes.c_void_p)]


def library() -> ctypes.CDLL:
    """The loaded library (``available()`` must be true)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"bitsmith's native kernels are not available: {_status}")
    return lib


def available() -> bool:
    return _library() is not None


def status() -> str:
    """One line: whether the native kernels are in use here, and if not, why."""
    _library()
    return _status


def _threads() -> int:
    return torch.get_num_threads()


def quantize_per_token_u8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float32 contiguous -> (codes (M, K) uint8 with zero point 128, scale (M, 1) float32)."""
    rows, cols = x.shape
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scale = torch.empty(rows, 1, dtype=torch.float32)
    _library().bitsmith_quantize_per_token_u8(x.data_ptr(), rows, cols, codes.data_ptr(), scale.data_ptr(), _threads())
    return codes, scale


def quantize_per_token_split_u8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float32 contiguous -> (codes (M, 2K) uint8 [p | q] with zero point 64, scale (M, 1))."""
    rows, cols = x.shape
    codes = torch.empty(rows, 2 * cols, dtype=torch.uint8)
    scale = torch.empty(rows, 1, dtype=torch.float32)
    _library().bitsmith_quantize_per_token_split_u8(
        x.data_ptr(), rows, cols, codes.data_ptr(), scale.data_ptr(), _threads()
    )
    return codes, scale


def scale_rows_add_bias(out: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """In place on ``out`` (M, N) float32: ``out * scale[:, None] + bias``."""
    rows, cols = out.shape
    bias_ptr = None if bias is None else bias.data_ptr()
    _library().bitsmith_scale_rows_add_bias(out.data_ptr(), rows, cols, scale.data_ptr(), bias_ptr, _threads())
    return out


def quantize_static_u8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """x float32 contiguous (any shape) -> uint8 codes ``clamp(round(x / scale) + zero_point, 0, 255)``."""
    codes = torch.empty(x.shape, dtype=torch.uint8, memory_format=_memory_format(x))
    _library().bitsmith_quantize_static_u8(x.data_ptr(), x.numel(), 1.0 / scale, zero_point, codes.data_ptr(), _threads())
    return codes


def quantize_static_channel_u8(x: torch.Tensor, multiplier: torch.Tensor, zero_point: int) -> torch.Tensor:
    """x (M, K) float32 contiguous, multiplier (K,) float32 -> codes ``clamp(round(x * multiplier) + zp, 0, 255)``."""
    rows, cols = x.shape
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    multiplier = multiplier.float().contiguous()
    _library().bitsmith_quantize_static_channel_u8(
        x.data_ptr(), rows, cols, multiplier.data_ptr(), zero_point, codes.data_ptr(), _threads()
    )
    return codes


def quantize_static_split_u8(x: torch.Tensor, scale: float, zero_point: int, block: int,
                             multiplier: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) float32 contiguous -> (M, 2K) uint8: the codes of ``quantize_static_u8`` (or, with a
    per-column ``multiplier``, of ``quantize_static_channel_u8``) split into [p | q] per run of ``block``
    columns, zero point ``(zero_point + 1) // 2`` (see csrc/quant.c)."""
    rows, cols = x.shape
    codes = torch.empty(rows, 2 * cols, dtype=torch.uint8)
    mult_ptr = None
    if multiplier is not None:
        multiplier = multiplier.float().contiguous()
        mult_ptr = multiplier.data_ptr()
    _library().bitsmith_quantize_static_split_u8(
        x.data_ptr(), rows, cols, block, mult_ptr, 1.0 / scale, zero_point, codes.data_ptr(), _threads()
    )
    return codes


def dequantize_packed(packed: torch.Tensor, bits: int, rows: int, cols: int, group: int, scale: torch.Tensor,
                      zero: torch.Tensor) -> torch.Tensor:
    """(rows, cols) float32 ``(code - zero) * scale`` from ``pack_codes``' bit stream; ``scale`` float32 and
    ``zero`` uint8 are (rows, ceil(cols / group))."""
    packed = packed.contiguous()
    out = torch.empty(rows, cols, dtype=torch.float32)
    scale, zero = scale.float().contiguous(), zero.to(torch.uint8).contiguous()
    _library().bitsmith_dequantize_packed(
        packed.data_ptr(), packed.numel(), bits, rows, cols, group, scale.data_ptr(), zero.data_ptr(),
        out.data_ptr(), _threads(),
    )
    return out


INT4_MAX_ROWS = 16  # BITSMITH_INT4_MAX_ROWS in csrc/quant.c: int4_matmul is for decoding's few rows


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, rows: int, group: int, scale: torch.Tensor,
                zero: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(M, rows) float32 ``x @ W.T + bias`` with W = (code - zero) * scale from 4-bit ``pack_codes`` codes, read
    packed; ``x`` (M, K) float32 with M <= INT4_MAX_ROWS, K and ``group`` even; ``scale`` float32 and ``zero``
    uint8 (rows, ceil(K / group))."""
    m, cols = x.shape
    x = x.contiguous()
    out = torch.empty(m, rows, dtype=torch.float32)
    bias = bias.float().contiguous() if bias is not None else None
    _library().bitsmith_int4_matmul(
        packed.data_ptr(), rows, cols, group, scale.data_ptr(), zero.data_ptr(), x.data_ptr(), m,
        bias.data_ptr() if bias is not None else None, out.data_ptr(), _threads(),
    )
    return out


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
