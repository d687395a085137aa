"""Data parallel training on torch.distributed: N processes (``bitsmith compress --nproc N``, or any launcher
that sets RANK / WORLD_SIZE, such as ``torchrun``) each take an equal slice of every global batch; after each
backward the gradients are averaged across them (an all-reduce, as DistributedDataParallel does), so every
process takes the same optimizer step as one process on the whole batch. gloo on CPU, nccl where GPUs are.

    world()                    -> (rank, size); (0, 1) when not distributed
    local_part(batch)          -> this process's rows of a global batch (tensors and dicts of tensors, dim 0)
    average_gradients_(params) -> every gradient the mean over the processes
    mean_across(value)         -> a float averaged over the processes (losses: every process reports the same)

Calibration of the block-wise post-training stages (GPTQ's and SparseGPT's Hessians, AWQ's input means): each
process accumulates the statistics of its share of the batches and they are merged (``merge_means``: the mean
weighted by rows, summed across processes), so every process quantizes with the statistics of all of them.
The rest of each block's run (its outputs for the next block) covers every batch on every process. Observers of
static activation ranges (min-max, and the histograms of percentile, entropy and MSE) and SmoothQuant's
per-channel input maxima are gathered the same way (``local_batches``, then ``gathered``: every process merges
every process's observers, in rank order, so all end with the same ranges). The moving-average observer depends
on the order of the batches: it sees every batch on every process. Only rank 0 writes outputs and checkpoints.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from bitsmith.errors import BitsmithError

__all__ = ["world", "is_main", "init_from_env", "shutdown", "local_part", "average_gradients_", "mean_across", "barrier",
           "merge_means", "merge_sums", "local_batches", "gathered"]


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def init_from_env() -> bool:
    """Join the process group a launcher describes (WORLD_SIZE > 1 in the environment); True if distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return world()[1] > 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return True


def shutdown() -> None:
    """Leave the process group: wait for every process (a barrier), then destroy it. A process that tears gloo
    down while another still talks to it, or exits with the group alive, can abort at exit (SIGABRT,
    "terminate called without an active exception"); a no-op when not distributed."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def local_part(batch):
    """This process's equal share of the rows of ``batch``; one line if they do not split evenly."""
    rank, size = world()
    if size == 1:
        return batch

    def part(tensor):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            return tensor
        if tensor.shape[0] % size:
            raise BitsmithError(f"a training batch of {tensor.shape[0]} rows does not split evenly over {size}"
                                f" processes: give a batch_size that {size} divides")
        return tensor.chunk(size)[rank]

    if isinstance(batch, dict):
        return {key: part(value) for key, value in batch.items()}
    return part(batch)


def average_gradients_(params) -> None:
    _, size = world()
    if size == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(size)


def mean_across(value: float) -> float:
    _, size = world()
    if size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item() / size)


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def merge_means(mean: torch.Tensor | None, rows: int, width: int) -> tuple[torch.Tensor | None, int]:
    """A (width, width) mean over ``rows`` rows on each process -> the mean over all processes' rows, and their
    count; (None, 0) when no process saw a row (GPTQ then rounds to nearest, as with one process)."""
    total = torch.tensor([float(rows)], dtype=torch.float64)
    dist.all_reduce(total)
    weighted = (mean.double() * rows) if mean is not None else torch.zeros(width, width, dtype=torch.float64)
    dist.all_reduce(weighted)
    if total.item() == 0:
        return None, 0
    dtype = mean.dtype if mean is not None else torch.float32
    return (weighted / total.item()).to(dtype), int(total.item())


def merge_sums(values: torch.Tensor | None, width: int) -> torch.Tensor:
    """Per-channel sums across processes (a process that saw nothing adds zeros)."""
    tensor = values.double() if values is not None else torch.zeros(width, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.float()


def local_batches(batches, mergeable: bool = True) -> tuple[list, bool]:
    """This process's share of calibration ``batches`` (every size-th, from its rank) and True, when what is
    computed on them merges (``gathered``); else all of them and False (one process; fewer batches than
    processes; statistics that depend on the order of the batches)."""
    rank, size = world()
    batches = list(batches)
    if size == 1 or not mergeable or len(batches) < size:
        return batches, False
    return batches[rank::size], True


def gathered(value) -> list:
    """``value`` of every process, in rank order (statistics objects: observers, dicts of tensors)."""
    _, size = world()
    if size == 1:
        return [value]
    values = [None] * size
    dist.all_gather_object(values, value)
    return values
