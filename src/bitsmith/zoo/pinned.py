"""Training the zoo's own models the same way on every x86-64 machine.

A model trained from a fixed seed is bitwise repeatable on one machine, but float sums are rounded in another
order where the vector width differs (AVX2 vs AVX512), another BLAS code path runs, or more threads split the
work: a fresh clone once got docs-lm at held-out perplexity 126.6 and digits-cnn at 99.11% where another
machine had 131.5 and 99.33%. So the zoo's builds run in a child process with every numeric library held to
one code path that every x86-64 machine of this project has (AVX2 and FMA) and one thread:

    variable                  | value          | holds
    ATEN_CPU_CAPABILITY       | avx2           | torch's own vectorized kernels
    ONEDNN_MAX_CPU_ISA        | AVX2           | oneDNN (convolutions, some matmuls)
    MKL_CBWR                  | AVX2,STRICT    | MKL's conditional numerical reproducibility (GEMM)
    MKL_ENABLE_INSTRUCTIONS   | AVX2           | MKL's dispatch
    OMP_NUM_THREADS           | 1              | one thread: no split reductions

Each build records its figures in the cache (``figures()`` of the zoo entry); tests and ``bitsmith zoo list``
use those, never numbers typed into the code. On a CPU without AVX2 (or not x86) the build runs unpinned, in
process, and its figures may differ from an x86 build's by float rounding (measured here: a few tenths of a
perplexity point, one test image of 450).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from bitsmith.errors import BitsmithError

__all__ = ["PINNED_ENV", "can_pin", "in_pinned_child", "run_pinned"]

PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2,STRICT",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
_MARK = "BITSMITH_PINNED_BUILD"


def can_pin() -> bool:
    from bitsmith.nn.cpu import cpu_flags

    return {"avx2", "fma"} <= cpu_flags()


def in_pinned_child() -> bool:
    return os.environ.get(_MARK) == "1"


def run_pinned(code: str, progress=None) -> None:
    """Run ``code`` (Python source) in a child process with the pinned environment; lines it prints that start
    with ``progress:`` go to ``progress``. A failure is one BitsmithError line with the child's last words."""
    env = {**os.environ, **PINNED_ENV, _MARK: "1"}
    with tempfile.TemporaryFile(mode="w+") as errors:  # a file, not a pipe: a chatty child cannot block on it
        child = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=errors, text=True)
        for line in child.stdout:
            if line.startswith("progress:") and progress is not None:
                progress(line.removeprefix("progress:").strip())
        if child.wait() != 0:
            errors.seek(0)
            last = (errors.read().strip().splitlines() or [f"exit status {child.returncode}"])[-1]
            raise BitsmithError(f"the zoo build failed: {last}")


def child_progress(message: str) -> None:
    """The progress callback inside a pinned child: one line to the parent."""
    print(f"progress: {message}", flush=True)
