"""Choosing a kernel by measurement, per CPU and per shape.

Which kernel is fastest depends on the CPU (bf16 is native with AVX512-BF16 or AMX and emulated without;
int8 is exact in one pass only with VNNI or AMX) and on the shape: at one row torch's packed int4/int8
kernels read a quarter or an eighth of the bytes of fp32, at thousands of rows a bf16 or fp32 GEMM on the
dequantized weight wins. So the first call of each (family, K, N, row bucket) times every candidate that
computes the same result on this machine, on the real input, and keeps the fastest for the rest of the
process; rows are bucketed by powers of two.

    variable                          | effect
    BITSMITH_KERNEL_<FAMILY>=<name>   | always use candidate <name> of that family (e.g. BITSMITH_KERNEL_W8A16=dequant-fp32)
    BITSMITH_AUTOTUNE=0               | no timing: the first candidate (the static preference order)

Every decision is kept with its timings (``decisions()``), so reports say what ran and why. A compressed
checkpoint records the decisions made when it was measured (``bitsmith.json`` "kernel_decisions", with the
machine key: CPU flags, library caps, torch version); loading it on the same machine runs the same kernels
(``seed``), so ``bitsmith eval`` reproduces the figures of ``bitsmith compress`` to the last bit (bf16 and fp32
candidates round differently). Nothing else is kept between processes: a noisy moment is not remembered.
A candidate other than the first (the static preference) has to be 5% faster to be chosen.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from bitsmith.errors import BitsmithError
from bitsmith.nn import cpu

__all__ = ["Decision", "choose", "decisions", "forced", "row_bucket", "reset", "seed", "export_decisions",
           "decisions_key"]

_TIMED_ROUNDS = 3  # after one warm-up call each; candidates alternate so load from others falls on all alike


@dataclass
class Decision:
    family: str
    key: str  # "K=384 N=1536 M<=8192"
    chosen: str
    how: str  # "measured" | "forced by BITSMITH_KERNEL_..." | "only candidate" | "static order"
    timings_ms: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        if self.timings_ms:
            times = ", ".join(f"{name} {ms:.3g} ms" for name, ms in sorted(self.timings_ms.items(), key=lambda kv: kv[1]))
            return f"{self.chosen} ({self.how} at {self.key}: {times})"
        return f"{self.chosen} ({self.how})"


_DECISIONS: dict[tuple[str, str], Decision] = {}
_MARGIN = 0.95  # another candidate must take at most 95% of the preferred one's time
_OUT_OF_RACE = 3.0  # a candidate this many times slower than the fastest in its first timed call is out


def decisions_key() -> str:
    """What decisions are valid for: this machine's kernel key, and whether the exact int8 path is forced."""
    return cpu.machine_key() + ("-int8-exact" if cpu.exact_int8_forced() else "")


def export_decisions() -> dict:
    """The measured decisions of this process, for a checkpoint's bitsmith.json."""
    measured = [asdict(d) for d in _DECISIONS.values() if d.how == "measured"]
    return {"key": decisions_key(), "decisions": measured}


def seed(recorded: dict | None) -> int:
    """Adopt decisions recorded in a checkpoint if they were made on a machine like this one; returns how many."""
    if not isinstance(recorded, dict) or recorded.get("key") != decisions_key():
        return 0
    adopted = 0
    for item in recorded.get("decisions") or []:
        try:
            decision = Decision(**{**item, "how": "recorded at compress time"})
        except TypeError:
            continue
        if isinstance(decision.family, str) and isinstance(decision.key, str) and isinstance(decision.chosen, str):
            _DECISIONS.setdefault((decision.family, decision.key), decision)
            adopted += 1
    return adopted


def row_bucket(rows: int) -> int:
    """The power of two at or above ``rows`` (decisions are shared inside a bucket)."""
    return 1 << max(0, int(rows) - 1).bit_length()


def _variable(family: str) -> str:
    return "BITSMITH_KERNEL_" + family.upper().replace("-", "_")


def forced(family: str) -> str | None:
    """The candidate name forced for ``family`` by its environment variable, if any."""
    value = os.environ.get(_variable(family), "").strip()
    return value or None


def _time(candidates: dict[str, Callable[[], object]], best: dict[str, float] | None = None) -> dict[str, float]:
    """The fastest of a few alternating calls of each candidate, in ms (after one warm-up call each, unless
    ``best`` holds an earlier measurement to improve on). A candidate other than the preferred (the first)
    whose first timed call takes more than ``_OUT_OF_RACE`` times the fastest is out after it (an emulated bf16
    GEMM, 9x the fp32 one on an AVX2 CPU: timing it three more times would only confirm it). The preferred one
    always runs every round: a burst of load on its first calls must not decide against it."""
    best = dict(best or {})
    warm = {}
    with torch.inference_mode():
        for name, run in candidates.items():
            if best:
                warm[name] = best[name] / 1e3
                continue
            start = time.perf_counter()
            run()
            warm[name] = time.perf_counter() - start
        rounds = _TIMED_ROUNDS if max(warm.values()) > 0.005 else 2 * _TIMED_ROUNDS  # cheap calls: more rounds
        preferred = next(iter(candidates))

        def in_race(name: str) -> bool:
            return name == preferred or best[name] <= _OUT_OF_RACE * min(best.values())

        racing = {name: run for name, run in candidates.items() if not best or in_race(name)}
        for round_ in range(rounds):
            for name, run in racing.items():
                start = time.perf_counter()
                run()
                elapsed = (time.perf_counter() - start) * 1e3
                best[name] = min(best.get(name, elapsed), elapsed)
            if round_ == 0:
                racing = {name: run for name, run in racing.items() if in_race(name)}
    return best


def _pick(timings: dict[str, float], preferred: str) -> str:
    fastest = min(timings, key=timings.get)
    return fastest if timings[fastest] <= _MARGIN * timings[preferred] else preferred


def choose(family: str, key: str, candidates: dict[str, Callable[[], object]]) -> str:
    """The name of the candidate to run for ``family`` at ``key``; ``candidates`` maps each name (in
    preference order) to a call that runs it once on the real input."""
    if not candidates:
        raise ValueError(f"no kernel candidates for {family}")
    name = forced(family)
    if name is not None:
        if name not in candidates:
            raise BitsmithError(
                f"{_variable(family)}={name} is not a {family} kernel on this machine; available: {', '.join(candidates)}"
            )
        _DECISIONS.setdefault((family, key), Decision(family, key, name, f"forced by {_variable(family)}"))
        return name
    cached = _DECISIONS.get((family, key))
    if cached is not None and cached.chosen in candidates:
        return cached.chosen
    if len(candidates) == 1:
        decision = Decision(family, key, next(iter(candidates)), "only candidate here")
    elif os.environ.get("BITSMITH_AUTOTUNE", "1") == "0" or torch.jit.is_tracing() or torch.compiler.is_compiling():
        decision = Decision(family, key, next(iter(candidates)), "static preference order (not timed)")
    else:
        preferred = next(iter(candidates))
        timings = _time(candidates)
        chosen = _pick(timings, preferred)
        if chosen != preferred:  # leaving the preferred kernel on one burst of load would stick: confirm it
            timings = _time(candidates, timings)
            chosen = _pick(timings, preferred)
        decision = Decision(family, key, chosen, "measured", {name: round(ms, 4) for name, ms in timings.items()})
    _DECISIONS[(family, key)] = decision
    return decision.chosen


def decisions(family: str | None = None) -> list[Decision]:
    """Every decision made in this process (of one family, if given)."""
    return [d for (f, _), d in _DECISIONS.items() if family is None or f == family]


def reset() -> None:
    """Forget every decision of this process (tests; or after changing BITSMITH_* variables)."""
    _DECISIONS.clear()
