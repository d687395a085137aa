"""Data parallel training: 2 processes on torch.distributed (gloo), each on half of every batch, end where one
process on the whole batches ends."""

import contextlib

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

import bitsmith
from bitsmith import BitsmithError, Recipe
from bitsmith.pipeline.distributed import local_part, shutdown, world
from conftest import tiny_llama

QAT_W4 = {"qat": {"rules": [{"targets": ["Linear"], "scheme": {"weights": {"dtype": "int4", "granularity": 16,
                                                                          "symmetric": False}}}],
                  "steps": 12, "lr": 1e-3, "held_out": 0.2}}


@contextlib.contextmanager
def _group(rank: int, size: int, init: str):
    """A gloo process group of ``size`` (none for 1), on one thread a process."""
    torch.set_num_threads(1)
    if size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=size)
    assert world() == (rank, size)
    try:
        yield
    finally:
        shutdown()


def _one_and_two(worker, tmp_path) -> tuple[dict, dict]:
    """What ``worker`` saved from one process, and from two processes (spawned, joined through a file)."""
    worker(0, 1, "", str(tmp_path / "one.safetensors"))
    mp.start_processes(worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two.safetensors")), nprocs=2,
                       start_method="spawn")
    return load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))


def _train(rank: int, size: int, init: str, out: str) -> None:
    with _group(rank, size, init):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
        generator = torch.Generator().manual_seed(1)
        batches = [torch.randn(8, 32, generator=generator) for _ in range(10)]
        report = bitsmith.run_stages(model, Recipe.model_validate({"version": 2, "name": "q", "stages": [QAT_W4]}),
                                     batches)
        if rank == 0:
            state = {k: v.float() for k, v in model.state_dict().items()}
            state["held_out_loss_after"] = torch.tensor([report.stages[0].summary["held_out_loss_after"]])
            save_file(state, out)


def test_two_processes_end_where_one_does(tmp_path):
    one, two = _one_and_two(_train, tmp_path)
    assert one.keys() == two.keys()
    for key in one:
        # the same steps; the gradient's sum is taken in another order (two halves, then the all-reduce)
        assert torch.allclose(one[key], two[key], rtol=1e-4, atol=1e-5), key
    scale = "0.weight_scale"
    assert not torch.equal(one[scale], torch.zeros_like(one[scale]))


def _gptq(rank: int, size: int, init: str, out: str) -> None:
    with _group(rank, size, init):
        model = tiny_llama()
        generator = torch.Generator().manual_seed(1)
        batches = [{"input_ids": torch.randint(0, 64, (2, 16), generator=generator)} for _ in range(6)]
        scheme = {"weights": {"dtype": "int4", "granularity": 32, "symmetric": False, "algorithm": "gptq"}}
        bitsmith.run_stages(model, Recipe.model_validate({"version": 2, "name": "g", "stages": [{"quantize": {
            "rules": [{"targets": ["Linear"], "scheme": scheme}], "ignore": ["lm_head"]}}]}), batches)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in model.state_dict().items() if "weight_" in k}, out)


def test_gptq_hessians_of_two_processes_shares_are_those_of_one_process(tmp_path):
    one, two = _one_and_two(_gptq, tmp_path)
    packed = [k for k in one if k.endswith("weight_packed")]
    assert len(packed) == 14  # 7 Linears a block, 2 blocks
    same = sum(int((one[k] == two[k]).sum()) for k in packed) / sum(one[k].numel() for k in packed)
    # each process accumulates the Hessian of 3 of the 6 batches; merged, they are the 6-batch Hessian up to the
    # order of float sums, which can move a code whose value sits on a rounding boundary
    assert same > 0.999, same
    for k in one:
        if k.endswith("weight_scale"):
            assert torch.allclose(one[k].float(), two[k].float(), rtol=1e-3), k


def _static(rank: int, size: int, init: str, out: str) -> None:
    """SmoothQuant, then static W8A8 with min-max observers on the attention and percentile ones on the MLP."""
    with _group(rank, size, init):
        model = tiny_llama()
        generator = torch.Generator().manual_seed(2)
        batches = [{"input_ids": torch.randint(0, 64, (2, 16), generator=generator)} for _ in range(5)]

        def scheme(observer):
            return {"weights": {"dtype": "int8"}, "activations": {"granularity": "tensor", "dynamic": False,
                                                                  "observer": observer}}

        bitsmith.run_stages(model, Recipe.model_validate({"version": 2, "name": "s", "stages": [
            {"smooth": {"alpha": 0.5}},
            {"quantize": {"rules": [{"targets": [r"re:.*self_attn\..*"], "scheme": scheme("minmax")},
                                    {"targets": [r"re:.*mlp\..*"], "scheme": scheme("percentile")}],
                          "ignore": ["lm_head"]}}]}), batches)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)


def test_observers_and_smoothquant_maxima_of_two_processes_shares_are_those_of_one_process(tmp_path):
    """5 batches: one process takes 3, the other 2; their observers and input maxima are merged."""
    one, two = _one_and_two(_static, tmp_path)
    assert one.keys() == two.keys()
    inputs = [k for k in one if k.endswith("input_scale")]
    assert len(inputs) == 14
    for key in one:
        if "self_attn" in key or not key.endswith(("input_scale", "input_zero_point")):
            # min-max ranges and the smoothed weights (maxima of maxima) are exact
            assert torch.equal(one[key], two[key]), key
        else:
            # percentile over merged histograms: the two shares' bins re-binned to one edge, within 2 bins of 2048
            assert torch.allclose(one[key].float(), two[key].float(), rtol=2e-3, atol=1), key


def test_a_batch_that_does_not_split_is_one_line(monkeypatch):
    monkeypatch.setattr("bitsmith.pipeline.distributed.world", lambda: (1, 2))
    assert torch.equal(local_part(torch.arange(8).reshape(4, 2)), torch.tensor([[4, 5], [6, 7]]))
    part = local_part({"input_ids": torch.arange(4), "flag": 1})
    assert part["input_ids"].tolist() == [2, 3] and part["flag"] == 1
    try:
        local_part(torch.zeros(3, 2))
    except BitsmithError as err:
        assert "3 rows does not split evenly over 2 processes" in str(err)
    else:
        raise AssertionError("no error")
    assert world() == (0, 1)  # the real one: not distributed here
