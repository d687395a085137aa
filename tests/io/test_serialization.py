"""save / load on the real MiniLM: same class, same outputs, bytes that reflect the bits, bad input."""

import copy
import json

import pytest
import torch
from transformers import BertModel

import bitsmith
from bitsmith import BitsmithError
from bitsmith.nn import IntxWeightOnlyLinear
from bitsmith.zoo.minilm import sentence_embeddings


@pytest.fixture(scope="module")
def saved_w4(minilm, tmp_path_factory):
    model = copy.deepcopy(minilm[0])
    bitsmith.quantize_(model, bitsmith.load_recipe("w4a16"))
    out = tmp_path_factory.mktemp("ckpt") / "w4"
    bitsmith.save(model, out, tokenizer=minilm[1], metrics={"mean_cosine": 0.9})
    return model, out


def test_load_returns_source_class_with_identical_outputs(minilm, saved_w4):
    model, out = saved_w4
    loaded = bitsmith.load(out)
    assert type(loaded) is BertModel
    batch = minilm[2]
    assert torch.equal(sentence_embeddings(loaded, batch), sentence_embeddings(model, batch))
    meta = json.loads((out / "bitsmith.json").read_text())
    assert meta["recipe"]["name"] == "w4a16" and meta["metrics"]["mean_cosine"] == 0.9
    assert meta["versions"]["torch"].startswith("2.13")


def test_int4_bits_on_disk_at_most_4_3_per_weight(saved_w4):
    model, out = saved_w4
    from safetensors import safe_open

    quantized_weights, stored_bits = 0, 0
    with safe_open(out / "model.safetensors", "pt") as f:
        for name, module in model.named_modules():
            if isinstance(module, IntxWeightOnlyLinear):
                quantized_weights += module.in_features * module.out_features
                for part in ("weight_packed", "weight_scale", "weight_zero_point"):
                    t = f.get_tensor(f"{name}.{part}")
                    stored_bits += t.numel() * t.element_size() * 8
    assert stored_bits / quantized_weights <= 4.3  # 4.1875: 4 + 16/128 (fp16 scale) + 8/128 (zero)


def test_w4a16_file_is_small(saved_w4):
    from bitsmith.zoo.minilm import model_dir

    ratio = (saved_w4[1] / "model.safetensors").stat().st_size / (model_dir() / "model.safetensors").stat().st_size
    assert ratio <= 0.22  # 0.196


def test_save_refuses_non_empty_out(saved_w4):
    with pytest.raises(BitsmithError, match="already exists and is not an empty directory"):
        bitsmith.save(saved_w4[0], saved_w4[1])


def test_truncated_checkpoint(saved_w4, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(saved_w4[1], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BitsmithError, match="truncated or corrupt checkpoint"):
        bitsmith.load(broken)


def test_bit_flip_is_caught_by_checksum(saved_w4, tmp_path):
    import shutil

    broken = tmp_path / "flipped"
    shutil.copytree(saved_w4[1], broken)
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (broken / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BitsmithError, match="does not match the checksum"):
        bitsmith.load(broken)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(BitsmithError, match="no such model directory"):
        bitsmith.load(tmp_path / "missing")
    with pytest.raises(BitsmithError, match="not a bitsmith checkpoint"):
        bitsmith.load(tmp_path)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    import bitsmith.io.serialization as ser

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ser, "save_file", boom)
    with pytest.raises(OSError):
        bitsmith.save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_plain_module_round_trip_with_skeleton(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    reference = copy.deepcopy(model)
    bitsmith.quantize_(model, bitsmith.load_recipe("w8a8-dynamic"))
    bitsmith.save(model, tmp_path / "m")
    with pytest.raises(BitsmithError, match="pass an instance of it"):
        bitsmith.load(tmp_path / "m")
    loaded = bitsmith.load(tmp_path / "m", model=reference)
    x = torch.randn(5, 64)
    assert torch.equal(loaded(x), model(x))


def test_grouped_embedding_table_round_trips(tmp_path):
    """An Embedding rule with a group size: int4 rows with one scale per 16 values, saved and loaded exactly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(100, 48), torch.nn.Linear(48, 8))
    reference, original = copy.deepcopy(model), copy.deepcopy(model)
    config = bitsmith.QuantizeConfig.model_validate({"rules": [
        {"targets": ["Embedding"], "scheme": {"weights": {"dtype": "int4", "granularity": 16, "symmetric": False}}}]})
    report = bitsmith.quantize_(model, config)
    assert "0" in report.quantized and model[0].weight_scale.shape == (100, 3)
    bitsmith.save(model, tmp_path / "m")
    loaded = bitsmith.load(tmp_path / "m", model=reference)
    ids = torch.randint(0, 100, (2, 7))
    assert loaded[0].group_size == 16 and torch.equal(loaded(ids), model(ids))
    assert not torch.equal(loaded(ids), original(ids))  # quantized, not the float table back
