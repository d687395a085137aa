"""The qat stage and prepare_qat_ / convert_: at 0 steps it is post-training quantization exactly; trained, its
runtime modules compute what the fake-quantized model computed; all or nothing on a bad run."""

import copy
import json

import pytest
import torch
from torch import nn

import bitsmith
from conftest import tiny_llama
from bitsmith import BitsmithError, QATConfig, Recipe
from bitsmith.nn import Int8DynamicLinear, Int8WeightOnlyLinear, IntxWeightOnlyLinear, StaticInt8Conv2d, StaticInt8Linear

W4_G16 = {"weights": {"dtype": "int4", "granularity": 16, "symmetric": False}}
W8 = {"weights": {"dtype": "int8"}}
W8A8_DYNAMIC = {"weights": {"dtype": "int8"}, "activations": {}}
W4A8_STATIC = {"weights": {"dtype": "int4"}, "activations": {"granularity": "tensor", "dynamic": False}}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 10)).eval()


def _batches(shape, count=10):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def _recipe(stage: str, scheme: dict, **options) -> Recipe:
    body = {"rules": [{"targets": ["Linear", "Conv2d"], "scheme": scheme}], **options}
    return Recipe.model_validate({"version": 2, "name": stage, "stages": [{stage: body}]})


@pytest.mark.parametrize("make,shape,scheme,module", [
    (_mlp, (16, 32), W4_G16, IntxWeightOnlyLinear),
    (_mlp, (16, 32), W8, Int8WeightOnlyLinear),
    (_mlp, (16, 32), W8A8_DYNAMIC, Int8DynamicLinear),
    (_convnet, (4, 1, 8, 8), W4A8_STATIC, StaticInt8Conv2d),
])
def test_untrained_qat_is_post_training_quantization(make, shape, scheme, module):
    model, batches = make(), _batches(shape)
    ptq, qat = copy.deepcopy(model), copy.deepcopy(model)
    bitsmith.quantize_(ptq, _recipe("quantize", scheme), calibration=batches)
    report = bitsmith.quantize_(qat, _recipe("qat", scheme, steps=0), calibration=batches)
    assert [type(m) for m in qat.modules()] == [type(m) for m in ptq.modules()]
    assert isinstance(qat[0], module)
    if module is IntxWeightOnlyLinear:  # qat rounds by the fp16 scale it stores, PTQ by the fp32 one it chose
        for a, b in ((qat[0], ptq[0]), (qat[2], ptq[2])):
            assert torch.equal(a.weight_scale, b.weight_scale) and torch.equal(a.weight_zero_point, b.weight_zero_point)
            assert (a.codes() != b.codes()).float().mean() < 0.005  # 2 of 2048 codes: a tie moved by the fp16 scale
    else:
        assert torch.equal(qat(batches[0]), ptq(batches[0]))
    assert report.quantized["0"].endswith(" qat")


def test_training_lowers_the_held_out_loss_and_converts_to_what_was_trained():
    model, batches = _mlp(), _batches((16, 32), 20)
    student = copy.deepcopy(model)
    config = QATConfig.model_validate({"rules": [{"targets": ["Linear"], "scheme": W4_G16}], "steps": 60, "lr": 1e-3})
    bitsmith.prepare_qat_(student, config)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    for step in range(60):
        x = batches[step % 20]
        loss = (student(x) - model(x).detach()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        trained = student(batches[0])
        weights = [student[i].quantized_weight() for i in (0, 2)]
    done = bitsmith.convert_(student)
    assert done == {"0": "w4 g16 asym a16 qat", "2": "w4 g16 asym a16 qat"}
    assert isinstance(student[0], IntxWeightOnlyLinear)
    assert all(torch.equal(student[i].dequantize(), w) for i, w in zip((0, 2), weights))  # the trained weights exactly
    assert torch.allclose(student(batches[0]), trained, atol=0.02)  # max 0.008: the kernel runs bf16 activations

    staged = copy.deepcopy(model)
    report = bitsmith.quantize_(staged, _recipe("qat", W4_G16, steps=100, loss="mse"), calibration=batches)
    summary = report.stages[0].summary
    assert summary["held_out_batches"] == 2 and summary["train_batches"] == 18
    assert summary["held_out_loss_after"] < 0.85 * summary["held_out_loss_before"]  # 3.77e-4 -> 2.6e-4
    assert summary["train_loss_last"] < summary["train_loss_first"]


def test_qat_static_model_saves_and_loads(tmp_path):
    model, batches = _convnet(), _batches((4, 1, 8, 8))
    bitsmith.quantize_(model, _recipe("qat", W4A8_STATIC, steps=20, lr=1e-3), calibration=batches)
    assert isinstance(model[-1], StaticInt8Linear) and isinstance(model[1], nn.Identity)  # ReLU fused as PTQ does
    assert int(model[0].weight_codes.abs().max()) <= 8  # int4 codes held as int8
    bitsmith.save(model, tmp_path / "m")
    loaded = bitsmith.load(tmp_path / "m", model=_convnet())
    assert torch.equal(loaded(batches[0]), model(batches[0]))


def test_a_diverging_run_stops_with_one_line_and_leaves_the_model_alone():
    model, batches = _mlp(), _batches((16, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BitsmithError, match=r"qat: the loss became (nan|inf) at step \d+; lower lr"):
        bitsmith.quantize_(model, _recipe("qat", W4_G16, steps=50, lr=1e30), calibration=batches)
    assert isinstance(model[0], nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("rules,message", [
    ([{"targets": ["Linear"], "scheme": {"weights": {"dtype": "fp16"}}}], "qat trains integer grids"),
    ([{"targets": ["Linear"], "scheme": {"weights": {"dtype": "int4", "granularity": 16, "algorithm": "gptq"}}}],
     "put a quantize stage with it before qat"),
])
def test_schemes_qat_cannot_train_are_refused(rules, message):
    with pytest.raises(BitsmithError, match=message):
        bitsmith.recipe.config_from_dict({"version": 2, "name": "q", "stages": [{"qat": {"rules": rules}}]}, Recipe)


def test_a_partial_last_group_trains_and_converts_as_post_training_quantization_pads_it():
    """24 inputs in groups of 16 (smollm2's 576 in groups of 128 alike): the last group has 8 inputs."""
    torch.manual_seed(0)
    model, batches = nn.Sequential(nn.Linear(24, 4)), _batches((8, 24))
    ptq, qat, trained = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    bitsmith.quantize_(ptq, _recipe("quantize", W4_G16), calibration=batches)
    bitsmith.quantize_(qat, _recipe("qat", W4_G16, steps=0), calibration=batches)
    assert qat[0].weight_scale.shape == ptq[0].weight_scale.shape == (4, 2)
    assert torch.equal(qat[0].weight_scale, ptq[0].weight_scale)
    assert (qat[0].codes() != ptq[0].codes()).float().mean() < 0.05
    config = QATConfig.model_validate({"rules": [{"targets": ["Linear"], "scheme": W4_G16}]})
    bitsmith.prepare_qat_(trained, config)
    fake = trained[0].quantized_weight()
    assert fake.shape == (4, 24)
    fake.sum().backward()
    assert trained[0].weight_scale.grad is not None and torch.isfinite(trained[0].weight_scale.grad).all()
    bitsmith.convert_(trained)
    assert isinstance(trained[0], IntxWeightOnlyLinear)
    assert torch.allclose(trained[0].float_weight(), fake.detach(), atol=1e-3)  # the fp16 scale: within rounding


def test_the_report_carries_a_loss_curve():
    model, batches = _mlp(), _batches((16, 32))
    report = bitsmith.quantize_(model, _recipe("qat", W8, steps=120), calibration=batches)
    curve = report.stages[0].summary["loss_curve"]
    assert len(curve) == 40 and curve[0][0] == 3 and curve[-1][0] == 120  # 120 steps in 40 points of 3
    assert model.bitsmith_stages[-1]["summary"]["loss_curve"] == curve  # what bitsmith.json keeps


class _Killed(BaseException):
    pass


def _kill_at(step: int):
    def progress(message: str) -> None:
        if message.startswith(f"qat step {step}/"):
            raise _Killed()

    return progress


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    batches = _batches((16, 32), 10)
    recipe = _recipe("qat", W4_G16, steps=12, lr=1e-3, checkpoint_every=4)
    whole = _mlp()
    bitsmith.run_stages(whole, recipe, batches)

    killed = _mlp()
    with pytest.raises(_Killed):
        bitsmith.run_stages(killed, recipe, batches, checkpoints=tmp_path, progress=_kill_at(10))
    assert isinstance(killed[0], nn.Linear)  # put back as it was; the step-8 checkpoint stays
    state = json.loads((tmp_path / "0-qat" / "state.json").read_text())
    assert state["step"] == 8 and len(state["losses"]) == 8
    resumed = _mlp()
    report = bitsmith.run_stages(resumed, recipe, batches, checkpoints=tmp_path, resume=True)
    assert report.stages[0].summary["resumed_at_step"] == 8
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()):
        assert torch.equal(a, b)  # the same codes, scales and biases as the run never killed

    fresh = bitsmith.run_stages(_mlp(), recipe, batches, checkpoints=tmp_path / "none", resume=True)
    assert fresh.stages[0].summary["resume"].startswith("no checkpoint in ")  # said, not silent

    other = _recipe("qat", W4_G16, steps=12, lr=2e-3, checkpoint_every=4)
    with pytest.raises(BitsmithError, match="is of another run"):
        bitsmith.run_stages(_mlp(), other, batches, checkpoints=tmp_path, resume=True)


def _llama():
    return tiny_llama()


def _token_batches(count=8):
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 64, (4, 16), generator=generator)} for _ in range(count)]


W4_G32_GPTQ = {"weights": {"dtype": "int4", "granularity": 32, "symmetric": False, "algorithm": "gptq"}}
W4_G32 = {"weights": {"dtype": "int4", "granularity": 32, "symmetric": False}}


def _gptq_then_qat(qat_scheme, **options) -> Recipe:
    quantize = {"rules": [{"targets": ["Linear"], "scheme": W4_G32_GPTQ}], "ignore": ["lm_head"]}
    qat = {"rules": [{"targets": ["Linear"], "scheme": qat_scheme}], "ignore": ["lm_head"], **options}
    return Recipe.model_validate({"version": 2, "name": "g", "stages": [{"quantize": quantize}, {"qat": qat}]})


def test_qat_starts_from_an_earlier_gptq_result():
    batches = _token_batches()
    gptq = _llama()
    bitsmith.run_stages(gptq, Recipe.model_validate({"version": 2, "name": "g", "stages": [
        {"quantize": {"rules": [{"targets": ["Linear"], "scheme": W4_G32_GPTQ}], "ignore": ["lm_head"]}}]}), batches)
    untrained = _llama()
    report = bitsmith.run_stages(untrained, _gptq_then_qat(W4_G32, steps=0), batches)
    assert report.stages[1].layers["model.layers.0.mlp.up_proj"]["done"] == "w4 g32 asym a16 qat"
    for (name, a), b in zip(untrained.state_dict().items(), gptq.state_dict().values()):
        assert torch.equal(a, b), name  # at 0 steps: GPTQ's codes, scales and zero points exactly
    rtn = _llama()
    bitsmith.run_stages(rtn, _recipe("qat", W4_G32, steps=0, ignore=["lm_head"]), batches)
    assert not torch.equal(rtn.model.layers[0].mlp.up_proj.weight_packed, gptq.model.layers[0].mlp.up_proj.weight_packed)

    # trained from there (whether it helps is the bench's question: this random model's KL is noise-sized)
    trained = _llama()
    bitsmith.run_stages(trained, _gptq_then_qat(W4_G32, steps=5, lr=1e-3), batches)
    layer, start = trained.model.layers[1].self_attn.o_proj, gptq.model.layers[1].self_attn.o_proj
    assert isinstance(layer, IntxWeightOnlyLinear)
    assert not (torch.equal(layer.weight_packed, start.weight_packed) and torch.equal(layer.weight_scale, start.weight_scale))


def test_qat_on_an_earlier_result_of_another_grid_is_one_line():
    model = _llama()
    w3 = {"weights": {"dtype": "int3", "granularity": 32, "symmetric": False}}
    with pytest.raises(BitsmithError, match=r"layer 'model.layers.0.self_attn.q_proj' was quantized by an earlier stage"
                                            r" \(.*\); qat's rule gives it w3 g32 asym a16"):
        bitsmith.run_stages(model, _gptq_then_qat(w3, steps=1), _token_batches())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear  # the model as it was
