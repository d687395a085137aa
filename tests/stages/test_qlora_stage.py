"""The qlora stage: a frozen NF4 (or int4) base with LoRA adapters, trained on text; peft loads the adapters."""

import json

import pytest
import torch
from torch import nn
from conftest import tiny_llama

import bitsmith
from bitsmith import BitsmithError, Recipe
from bitsmith.nn import IntxWeightOnlyLinear, LookupWeightOnlyLinear, LoRALinear

NF4_DQ = {"weights": {"dtype": "nf4", "granularity": 64, "double_quant": True}}
INT4 = {"weights": {"dtype": "int4", "granularity": 32, "symmetric": False}}


def _llama():
    return tiny_llama()


def _batches(count=12):
    """Counting text: each next token is the last plus one (mod 64), from a random start: learnable."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        start = torch.randint(0, 64, (4, 1), generator=generator)
        ids = (start + torch.arange(16)) % 64
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return batches


def _recipe(scheme=NF4_DQ, **options) -> Recipe:
    stage = {"rules": [{"targets": ["Linear"], "scheme": scheme}], "ignore": ["lm_head"], "rank": 8,
             "alpha": 16.0, "steps": 40, "lr": 1e-2, **options}
    return Recipe.model_validate({"version": 2, "name": "q", "stages": [{"qlora": stage}]})


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_untrained_adapters_leave_the_base_exactly():
    model, batch = _llama(), _batches(1)[0]
    reference = _llama()
    bitsmith.quantize_(reference, Recipe.model_validate({"version": 2, "name": "n", "stages": [{"quantize": {
        "rules": [{"targets": ["Linear"], "scheme": NF4_DQ}], "ignore": ["lm_head"]}}]}))
    bitsmith.prepare_qlora_(model, _recipe().stages[0])
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, LoRALinear) and isinstance(q_proj.base, LookupWeightOnlyLinear)
    assert q_proj.base.fmt == "nf4-dq" and torch.count_nonzero(q_proj.lora_B) == 0
    assert torch.equal(_logits(model, batch), _logits(reference, batch))  # B = 0: the NF4 model itself


def test_gradients_through_a_frozen_quantized_layer_are_those_of_its_dequantized_weight():
    linear = nn.Linear(64, 32)
    module = IntxWeightOnlyLinear.from_quantized(
        bitsmith.algorithms.rtn.quantize_weight_rtn(linear.weight.detach(), 4, 32, False, "minmax"), linear.bias)
    x = torch.randn(5, 64, requires_grad=True)
    module(x).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    nn.functional.linear(x2, module.dequantize(), module.bias).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_training_lowers_the_held_out_loss_and_peft_loads_the_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    model, batches = _llama(), _batches()
    report = bitsmith.run_stages(model, _recipe(), batches)
    summary = report.stages[0].summary
    assert summary["loss"] == "text" and summary["adapter_parameters"] == 8 * sum(
        m.in_features + m.out_features for m in model.modules() if isinstance(m, LoRALinear))
    assert summary["held_out_loss_after"] < 0.9 * summary["held_out_loss_before"]  # 4.19 -> 3.42 here
    bitsmith.save(model, tmp_path / "m")
    files = json.loads((tmp_path / "m" / "adapter" / "adapter_config.json").read_text())
    assert files["r"] == 8 and files["lora_alpha"] == 16.0 and files["task_type"] == "CAUSAL_LM"
    assert "model.layers.0.self_attn.q_proj" in files["target_modules"]

    # peft on the float base: the float weights plus B A * alpha / rank, layer by layer
    adapted = peft.PeftModel.from_pretrained(_llama(), str(tmp_path / "m" / "adapter")).eval()
    by_hand = _llama()
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            float_layer = by_hand.get_submodule(name)
            with torch.no_grad():
                float_layer.weight += layer.delta()
    batch = batches[0]
    assert torch.allclose(_logits(adapted, batch), _logits(by_hand, batch), atol=1e-4)

    loaded = bitsmith.load(tmp_path / "m")  # the NF4 base with its adapters, as trained
    assert isinstance(loaded.model.layers[1].mlp.down_proj, LoRALinear)
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))


def test_merge_folds_the_adapters_into_the_float_weights_and_quantizes_again():
    batches = _batches()
    merged = _llama()
    report = bitsmith.run_stages(merged, _recipe(INT4, merge=True), batches)
    layer = merged.model.layers[0].mlp.up_proj
    assert isinstance(layer, IntxWeightOnlyLinear) and not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert report.stages[0].layers["model.layers.0.mlp.up_proj"]["done"].endswith("(lora merged)")
    unmerged = _llama()
    bitsmith.run_stages(unmerged, _recipe(INT4), batches)  # the same training, adapters kept
    expected = _llama().model.layers[0].mlp.up_proj.weight.detach() + unmerged.model.layers[0].mlp.up_proj.delta()
    error = (layer.dequantize() - expected).abs().max()
    step = (expected.abs().max() / 7).item()  # int4 steps are at most the range / 15; half a step is far below this
    assert error < step
    # the merged model follows the trained one on the task: its held-out loss stays far below the untrained
    batch = batches[0]
    ids = batch["input_ids"]
    loss = nn.functional.cross_entropy(_logits(merged, batch)[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    assert loss < 0.9 * report.stages[0].summary["held_out_loss_before"]


def test_a_model_without_token_logits_cannot_train_on_text():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    with pytest.raises(BitsmithError, match="loss text trains on token ids"):
        bitsmith.run_stages(model, _recipe(), [torch.randn(4, 64) for _ in range(4)])
    assert isinstance(model[0], nn.Linear)  # left as it was


@pytest.mark.parametrize("options,message", [
    ({"rank": 0}, "must be at least 1"),
    ({"lr": 0.0}, "must be a positive number"),
    ({"steps": -1}, "must be at least 0"),
    ({"dropout": 1.0}, r"must be in \[0, 1\)"),
    ({"match": ["model.layers.0"]}, "loss text trains on the text alone"),
    ({"rules": [{"targets": ["Linear"], "scheme": {"weights": {"dtype": "int8"}, "activations": {}}}]},
     "a QLoRA base is weight-only"),
    ({"rules": [{"targets": ["Linear"], "scheme": {"weights": {"dtype": "int4", "double_quant": True}}}]},
     "double_quant applies to nf4"),
])
def test_bad_options_are_one_line(options, message):
    with pytest.raises(BitsmithError, match=message):
        bitsmith.recipe.config_from_dict({"version": 2, "name": "q", "stages": [{"qlora": {
            "rules": [{"targets": ["Linear"], "scheme": NF4_DQ}], **options}}]}, Recipe)


def test_merge_needs_a_qlora_stage():
    from bitsmith.api.compress import merged_recipe

    with pytest.raises(BitsmithError, match="--merge folds LoRA adapters into the weights: the recipe 'w4a16'"):
        merged_recipe(bitsmith.recipe.load_recipe("w4a16"))
    assert merged_recipe(bitsmith.recipe.load_recipe("qlora-nf4")).stages[0].merge


class _Killed(BaseException):
    pass


def test_a_killed_run_resumes_to_the_same_adapters_dropout_included(tmp_path):
    batches, recipe = _batches(), _recipe(steps=12, checkpoint_every=4, dropout=0.3)
    whole = _llama()
    bitsmith.run_stages(whole, recipe, batches)

    def kill(message):
        if message.startswith("qlora step 10/"):
            raise _Killed()

    with pytest.raises(_Killed):
        bitsmith.run_stages(_llama(), recipe, batches, checkpoints=tmp_path, progress=kill)
    resumed = _llama()
    report = bitsmith.run_stages(resumed, recipe, batches, checkpoints=tmp_path, resume=True)
    assert report.stages[0].summary["resumed_at_step"] == 8
    for (name, a), b in zip(resumed.state_dict().items(), whole.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_loss_gone_nan_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    batches, recipe = _batches(), _recipe(steps=12, checkpoint_every=4)
    model = _llama()

    def poison(message):  # after step 6 an adapter holds NaN: the loss of step 7 is NaN
        if message.startswith("qlora step 6/"):
            with torch.no_grad():
                model.model.layers[0].self_attn.q_proj.lora_A.fill_(float("nan"))

    with pytest.raises(BitsmithError, match=r"qlora: the loss became nan at step 7; lower lr"):
        bitsmith.run_stages(model, recipe, batches, checkpoints=tmp_path, progress=poison)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)  # the model as it was
    state = json.loads((tmp_path / "0-qlora" / "state.json").read_text())
    assert state["step"] == 4  # the last good one, whole
    report = bitsmith.run_stages(_llama(), recipe, batches, checkpoints=tmp_path, resume=True)
    assert report.stages[0].summary["resumed_at_step"] == 4


@pytest.mark.parametrize("undo", [True, False])
def test_without_undo_the_replaced_float_layers_are_freed_before_training(undo):
    """compress runs on its own copy with undo=False: QLoRA's float weights must not live through the steps."""
    import gc
    import weakref

    model = _llama()
    original = weakref.ref(model.model.layers[0].mlp.up_proj.weight)
    alive = []

    def progress(message):
        if isinstance(message, str) and " step " in message:
            gc.collect()
            alive.append(original() is not None)

    bitsmith.run_stages(model, _recipe(steps=2), _batches(), progress=progress, undo=undo)
    assert alive and all(alive) == undo and not any(alive) != undo


def test_gradient_checkpointing_recomputes_each_block_and_trains_to_the_same_adapters():
    """Each block's inside runs again in the backward (its attention is called once more per step), dropout's mask
    replayed: the adapters end as without it; afterwards the blocks and the config's use_cache are as they were."""
    batches, calls = _batches(), {}
    models = {}
    for checkpointing in (False, True):
        model = models[checkpointing] = _llama()
        for block in model.model.layers:
            block.self_attn.register_forward_hook(
                lambda *_, key=checkpointing: calls.__setitem__(key, calls.get(key, 0) + 1))
        bitsmith.run_stages(model, _recipe(steps=6, dropout=0.3, gradient_checkpointing=checkpointing), batches)
    assert calls[True] - calls[False] == 6 * len(models[True].model.layers)
    assert all("forward" not in block.__dict__ for block in models[True].model.layers)
    assert models[True].config.use_cache is True
    for (name, a), b in zip(models[True].state_dict().items(), models[False].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
