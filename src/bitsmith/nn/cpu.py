"""What this CPU can do, read from the machine rather than assumed.

Two kinds of facts decide which low-bit kernel is right here:

- instruction-set flags (``/proc/cpuinfo``, else torch's own cpuinfo helpers), and the caps a user may
  have set on the libraries (``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``);
- a probe of oneDNN's int8 products. With VNNI (AVX512-VNNI, AVX-VNNI) or AMX, u8 x s8 products are
  summed straight into int32 and are exact. Without them oneDNN (like fbgemm and MLAS) uses
  ``vpmaddubsw``, which adds pairs of u8 x s8 products in *saturating* int16: 255 * 127 * 2 = 64770 does
  not fit, so W8A8 results are silently wrong unless every activation code stays below 128. The probe
  multiplies all-255 activations by all-127 weights and checks the sum, so it catches old CPUs, virtual
  machines that hide flags and capped libraries alike.

``BITSMITH_INT8=exact`` makes bitsmith treat oneDNN's int8 products as inexact even where they are not,
so the exact path of a machine without VNNI runs (and is tested) on any machine.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform

import torch

__all__ = [
    "cpu_flags",
    "cpu_name",
    "library_caps",
    "int8_dot_product",
    "bf16_compute",
    "onednn_int8_available",
    "onednn_int8_exact",
    "exact_int8_forced",
    "int8_status",
    "int8_reason",
    "machine_key",
    "summary",
]

# flags that decide kernels: int8 dot products (VNNI / AMX), bf16 arithmetic, vector width
KERNEL_FLAGS = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
    "amx_tile", "amx_int8", "amx_bf16", "avx512_fp16", "amx_fp16", "asimd", "asimddp", "sve", "i8mm", "bf16",
)
_CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


@functools.cache
def cpu_flags() -> frozenset[str]:
    """Instruction-set flags of this CPU (x86 ``flags``, ARM ``Features``); from torch's cpuinfo where the
    kernel does not list them."""
    info = _cpuinfo()
    listed = (info.get("flags") or info.get("Features") or "").split()
    if listed:
        return frozenset(listed)
    helpers = {
        "avx2": "_is_avx2_supported", "avx512f": "_is_avx512_supported", "avx512_vnni": "_is_vnni_supported",
        "avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported",
    }
    found = set()
    for flag, helper in helpers.items():
        check = getattr(torch.cpu, helper, None)
        try:
            if check is not None and check():
                found.add(flag)
        except RuntimeError:
            pass
    if "amx_tile" in found:
        found.update({"amx_int8", "amx_bf16"})
    return frozenset(found)


def cpu_name() -> str:
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or platform.machine()


def library_caps() -> dict[str, str]:
    """Environment variables that cap the instruction sets torch's libraries use (they change kernels)."""
    return {name: os.environ[name] for name in _CAP_VARIABLES if os.environ.get(name)}


def int8_dot_product() -> str:
    """How this CPU multiplies int8 vectors, by its flags."""
    flags = cpu_flags()
    if "amx_int8" in flags:
        return "AMX-INT8"
    if "avx512_vnni" in flags:
        return "AVX512-VNNI"
    if "avx_vnni" in flags:
        return "AVX-VNNI"
    if "avx2" in flags:
        return "AVX2 without VNNI (u8 x s8 pairs summed in saturating int16)"
    return "no x86 int8 dot-product instructions"


def bf16_compute() -> str:
    """Whether bf16 arithmetic is native here (else torch emulates it, several times slower than fp32)."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "AMX-BF16"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    if "bf16" in flags:  # ARMv8.6 BF16
        return "ARM BF16"
    return "none (bf16 emulated)"


def _qlinear_u8(x_u8: torch.Tensor, weight_s8: torch.Tensor) -> torch.Tensor:
    packed = torch.ops.onednn.qlinear_prepack(weight_s8, None)
    n = weight_s8.shape[0]
    return torch.ops.onednn.qlinear_pointwise(
        x_u8, 1.0, 0, packed, torch.ones(n), torch.zeros(n, dtype=torch.long), None, 1.0, 0, torch.float32,
        "none", [None], "",
    )


def _qconv_u8(x_u8: torch.Tensor, weight_s8: torch.Tensor) -> torch.Tensor:
    n = weight_s8.shape[0]
    packed = torch.ops.onednn.qconv_prepack(weight_s8, torch.ones(n), 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None)
    return torch.ops.onednn.qconv2d_pointwise(
        x_u8, 1.0, 0, packed, torch.ones(n), torch.zeros(n, dtype=torch.long), None, [1, 1], [0, 0], [1, 1], 1,
        1.0, 0, torch.float32, "none", [], "",
    )


@functools.cache
def onednn_int8_available() -> bool:
    """Whether oneDNN's quantized linear runs here at all (x86 CPUs with mkldnn)."""
    try:
        out = _qlinear_u8(torch.full((2, 16), 2, dtype=torch.uint8), torch.ones(16, 16, dtype=torch.int8))
        return bool(torch.equal(out, torch.full((2, 16), 32.0)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@functools.cache
def _probe(op: str) -> bool:
    k = 64  # 255 * 127 * 64 = 2,072,640: exact in int32, 32 saturated int16 pairs would give 1,048,544
    try:
        if op == "linear":
            out = _qlinear_u8(torch.full((4, k), 255, dtype=torch.uint8), torch.full((8, k), 127, dtype=torch.int8))
        else:
            x = torch.full((1, k, 4, 4), 255, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
            out = _qconv_u8(x, torch.full((8, k, 1, 1), 127, dtype=torch.int8))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool((out == 255.0 * 127.0 * k).all())


def exact_int8_forced() -> bool:
    """``BITSMITH_INT8=exact``: run the no-VNNI exact int8 path even where oneDNN's products are exact."""
    return os.environ.get("BITSMITH_INT8", "").strip().lower() == "exact"


def onednn_int8_exact(op: str = "linear") -> bool:
    """Whether oneDNN's u8 x s8 ``op`` ("linear" or "conv") sums full-range products without saturating,
    measured by a probe; False where oneDNN int8 is unavailable or ``BITSMITH_INT8=exact`` is set."""
    if op not in ("linear", "conv"):
        raise ValueError(f"op must be 'linear' or 'conv', not {op!r}")
    return onednn_int8_available() and not exact_int8_forced() and _probe(op)


def machine_key() -> str:
    """Short hash of what kernels and native builds depend on: flags, library caps, torch and the machine."""
    parts = [platform.machine(), torch.__version__, " ".join(sorted(cpu_flags() & set(KERNEL_FLAGS)))]
    parts += [f"{k}={v}" for k, v in sorted(library_caps().items())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def int8_status(op: str = "linear") -> str:
    """One word or phrase for reports: how oneDNN's int8 ``op`` runs here."""
    if onednn_int8_exact(op):
        return "exact in one pass"
    if exact_int8_forced():
        return "exact split path forced (BITSMITH_INT8=exact)"
    if onednn_int8_available():
        return "one pass saturates: exact split path"
    return "not available"


def int8_reason(op: str) -> str:
    """Why oneDNN's one-pass int8 kernel does or does not run here (inspect's "why" for W8A8 layers)."""
    status = int8_status(op)
    if status == "exact in one pass":
        return f"{int8_dot_product()}: u8 x s8 products exact in one pass"
    if status == "one pass saturates: exact split path":
        caps = ", ".join(f"{k}={v}" for k, v in library_caps().items())
        where = int8_dot_product() + (f", capped by {caps}" if caps else "")
        return f"one-pass u8 x s8 sums saturate here ({where}): exact split path"
    return "BITSMITH_INT8=exact: exact no-VNNI path forced" if exact_int8_forced() else "no oneDNN int8 on this CPU"


def summary() -> dict:
    """What reports print about this machine's kernels."""
    return {
        "cpu": cpu_name(),
        "flags": sorted(cpu_flags() & set(KERNEL_FLAGS)),
        "int8_dot_product": int8_dot_product(),
        "onednn_int8": int8_status("linear"),
        "bf16": bf16_compute(),
        "library_caps": library_caps(),
    }
