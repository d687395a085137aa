"""Sparse layers in save / load on docs-lm: a 50%-sparse int4 model is stored smaller than the dense int4 one
and comes back bit for bit; float sparse layers too; dense models are stored as before; corrupt records and
bitmasks are refused with one line."""

import copy
import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import bitsmith
from bitsmith import BitsmithError
from bitsmith.nn import IntxWeightOnlyLinear

IDS = torch.arange(3, 67)[None]  # (1, 64) token ids


def _logits(model):
    with torch.inference_mode():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def saved(docs_lm_model, tmp_path_factory):
    """{name: (model, directory)} for float, dense int4, 50%-sparse int4 and 50%-sparse float docs-lm."""
    root = tmp_path_factory.mktemp("sparse")
    dense = copy.deepcopy(docs_lm_model[0])
    bitsmith.quantize_(dense, bitsmith.load_recipe("w4a16"))
    sparse_float = copy.deepcopy(docs_lm_model[0])
    bitsmith.prune_(sparse_float, bitsmith.load_recipe("magnitude-50"))
    sparse_int4 = copy.deepcopy(sparse_float)
    bitsmith.quantize_(sparse_int4, bitsmith.load_recipe("w4a16"))  # round-to-nearest keeps the zeros
    out = {}
    models = {"float": docs_lm_model[0], "dense-int4": dense, "sparse-int4": sparse_int4, "sparse-float": sparse_float}
    for name, model in models.items():
        bitsmith.save(model, root / name)
        out[name] = (model, root / name)
    return out


def _size(directory):
    return (directory / "model.safetensors").stat().st_size


def test_sparse_int4_is_smaller_than_dense_int4_and_round_trips_exactly(saved):
    model, directory = saved["sparse-int4"]
    # the pruned layers' codes in 3 bits a weight (a 1-bit mask and half the 4-bit codes) instead of 4; the
    # embedding (int8), lm_head (int4, not pruned), scales and zero points as before
    assert _size(directory) < 0.9 * _size(saved["dense-int4"][1])  # 0.881
    loaded = bitsmith.load(directory)
    assert torch.equal(_logits(loaded), _logits(model))
    for name, module in model.named_modules():
        if isinstance(module, IntxWeightOnlyLinear):
            twin = loaded.get_submodule(name)
            assert isinstance(twin, IntxWeightOnlyLinear) and torch.equal(twin.weight_packed, module.weight_packed)
    storage = json.loads((directory / "bitsmith.json").read_text())["sparse_storage"]
    assert len(storage) == 28  # every Linear but lm_head (4 blocks x 7)
    assert sum(r["bytes"] for r in storage.values()) <= 0.76 * sum(r["dense_bytes"] for r in storage.values())
    record = storage["model.layers.0.mlp.down_proj"]
    assert record["tensor"] == "weight_packed" and record["shape"] == [256, 768]
    assert record["sparsity"] == pytest.approx(0.5, abs=0.01)
    stored = load_file(directory / "model.safetensors")
    assert "model.layers.0.mlp.down_proj.weight_packed" not in stored
    assert stored["model.layers.0.mlp.down_proj.weight_packed.bitmask"].shape == (256, 96)


def test_sparse_float_round_trips_and_dense_models_are_stored_as_before(saved):
    model, directory = saved["sparse-float"]
    assert _size(directory) < 0.75 * _size(saved["float"][1])  # 0.719: a pruned weight in 17 bits, not 32
    loaded = bitsmith.load(directory)
    assert torch.equal(_logits(loaded), _logits(model))
    q = "model.layers.1.self_attn.q_proj"
    assert torch.equal(loaded.get_submodule(q).weight, model.get_submodule(q).weight)
    dense_meta = json.loads((saved["dense-int4"][1] / "bitsmith.json").read_text())
    assert "sparse_storage" not in dense_meta  # 4-bit codes at their zero point ~10% of the time: not worth it
    assert "sparse_storage" not in json.loads((saved["float"][1] / "bitsmith.json").read_text())
    assert "model.layers.0.mlp.down_proj.weight_packed" in load_file(saved["dense-int4"][1] / "model.safetensors")


def _rewrite(directory, change_tensors=None, change_meta=None):
    """Change the weights and/or bitsmith.json of a copied checkpoint, with checksums that match again (a
    writer that is consistent but wrong, not a damaged file)."""
    meta_path, weights = directory / "bitsmith.json", directory / "model.safetensors"
    meta = json.loads(meta_path.read_text())
    if change_tensors:
        tensors = load_file(weights)
        change_tensors(tensors)
        save_file(tensors, weights)
        meta["files"]["model.safetensors"] = {"bytes": weights.stat().st_size,
                                              "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    if change_meta:
        change_meta(meta)
    meta_path.write_text(json.dumps(meta))


LAYER = "model.layers.0.mlp.down_proj"


def _flip_kept_bit(tensors):
    bitmask = tensors[f"{LAYER}.weight_packed.bitmask"]
    bitmask[0, 0] ^= 1  # one weight more or less than the values stored


CASES = {
    "kept count": (None, lambda m: m["sparse_storage"][LAYER].update(kept=m["sparse_storage"][LAYER]["kept"] + 2),
                   "weight_packed.values' is U8"),
    "popcount": (_flip_kept_bit, None, "its bitmask keeps"),
    "no such layer": (None, lambda m: m["sparse_storage"].update({"model.layers.9.mlp": m["sparse_storage"][LAYER]}),
                      "sparse_storage of layer 'model.layers.9.mlp': the model has no such layer"),
    "wrong tensor": (None, lambda m: m["sparse_storage"][LAYER].update(tensor="weight"),
                     "IntxWeightOnlyLinear stores no sparse 'weight'"),
    "wrong shape": (None, lambda m: m["sparse_storage"][LAYER].update(shape=[768, 256]),
                    r"shape \[768, 256\], the layer is \[256, 768\]"),
    "not a record": (None, lambda m: m["sparse_storage"].update({LAYER: "bitmask"}), "is not a bitmask record"),
    "not a mapping": (None, lambda m: m.update(sparse_storage=[]), "'sparse_storage' must be a mapping"),
    "missing values": (lambda t: t.pop(f"{LAYER}.weight_packed.values"), None,
                       f"tensor '{LAYER}.weight_packed.values' is missing"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_corrupt_sparse_checkpoints_are_refused(saved, tmp_path, case):
    change_tensors, change_meta, message = CASES[case]
    broken = tmp_path / "broken"
    shutil.copytree(saved["sparse-int4"][1], broken)
    _rewrite(broken, change_tensors, change_meta)
    with pytest.raises(BitsmithError, match=message) as caught:
        bitsmith.load(broken)
    assert "\n" not in str(caught.value)


def test_half_int8_and_dynamic_layers_round_trip(tmp_path):
    """The other kinds with a sparse form: bf16 weights, int8 codes (weight-only and W8A8 dynamic)."""
    from torch import nn

    from bitsmith.nn import HalfLinear, Int8DynamicLinear, Int8WeightOnlyLinear

    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 32)).eval()
    model = copy.deepcopy(float_model)
    with torch.no_grad():
        for layer in (model[0], model[2], model[4]):
            layer.weight.mul_(layer.weight.abs() > layer.weight.abs().median())  # half of each layer to 0
    schemes = {"0": {"dtype": "bf16"}, "2": {"dtype": "int8", "granularity": "channel", "symmetric": True},
               "4": {"dtype": "int8", "granularity": "channel", "symmetric": True}}
    rules = [{"targets": [name], "scheme": {"weights": weights}} for name, weights in schemes.items()]
    rules[2]["scheme"]["activations"] = {"dtype": "int8", "dynamic": True}
    bitsmith.quantize_(model, bitsmith.QuantizeConfig.model_validate({"rules": rules}))
    assert [type(model[i]) for i in (0, 2, 4)] == [HalfLinear, Int8WeightOnlyLinear, Int8DynamicLinear]
    meta = bitsmith.save(model, tmp_path / "m")
    assert {n: r["tensor"] for n, r in meta["sparse_storage"].items()} == {"0": "weight", "2": "weight_codes",
                                                                            "4": "weight_codes"}
    loaded = bitsmith.load(tmp_path / "m", model=copy.deepcopy(float_model))
    x = torch.randn(8, 64)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
    for i, part in ((0, "weight"), (2, "weight_codes"), (4, "weight_codes")):
        assert torch.equal(getattr(loaded[i], part), getattr(model[i], part))
