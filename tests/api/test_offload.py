"""Block-by-block quantization from disk: same result as in memory, nothing half-written on bad input."""

import copy
import json
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import bitsmith
from bitsmith import BitsmithError
from bitsmith.recipe import config_from_dict
from bitsmith.api.offload import quantize_offloaded


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("ckpt") / "llama"
    model.save_pretrained(path, max_shard_size="500KB")  # several shards, blocks split across them
    return model, path


def _calibration():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 256, (4, 32), generator=g)} for _ in range(3)]


def _config(algorithm):
    return config_from_dict({"rules": [
        {"targets": ["Embedding"], "scheme": {"weights": {"dtype": "int8"}}},
        {"targets": ["Linear"], "scheme": {"weights": {"dtype": "int4", "granularity": 128, "symmetric": False,
                                                      "algorithm": algorithm}}},
    ]})


@pytest.mark.parametrize("algorithm", ["gptq", "awq", "rtn"])
def test_offloaded_equals_in_memory(checkpoint, tmp_path, algorithm):
    model, path = checkpoint
    assert len(list(path.glob("*.safetensors"))) > 3
    calibration = _calibration()
    result = quantize_offloaded(path, _config(algorithm), tmp_path / "out", calibration)
    assert result["blocks"] == 3 and len(result["quantized"]) == 3 * 7 + 2  # + embedding and lm_head
    meta = json.loads((tmp_path / "out" / "bitsmith.json").read_text())
    assert len(meta["files"]) == 4 and meta["recipe"]["stages"][0]["quantize"]["rules"][1]["scheme"]["weights"]["algorithm"] == algorithm
    loaded = bitsmith.load(tmp_path / "out")
    in_memory = copy.deepcopy(model)
    bitsmith.quantize_(in_memory, _config(algorithm), calibration=calibration)
    with torch.inference_mode():
        assert torch.equal(loaded(**calibration[0]).logits, in_memory(**calibration[0]).logits)


def test_offloaded_bad_inputs_leave_nothing(checkpoint, tmp_path):
    model, path = checkpoint
    broken = shutil.copytree(path, tmp_path / "broken")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = index["weight_map"]["model.layers.2.mlp.down_proj.weight"]
    data = (broken / victim).read_bytes()
    (broken / victim).write_bytes(data[: len(data) // 2])  # truncated shard
    with pytest.raises(BitsmithError, match="corrupt or truncated checkpoint"):
        quantize_offloaded(broken, _config("gptq"), tmp_path / "out", _calibration())
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    static = bitsmith.load_recipe("w8a8-static")  # fold_batchnorm, then static quantize
    with pytest.raises(BitsmithError, match="weights .* and dynamic W8A8 only"):
        quantize_offloaded(path, static, tmp_path / "out2", _calibration())
    folding = bitsmith.Recipe(name="fold", stages=[bitsmith.FoldBatchNormConfig(), _config("rtn")])
    with pytest.raises(BitsmithError, match=r"\(--offload\) cannot run stage 'fold_batchnorm'"):
        quantize_offloaded(path, folding, tmp_path / "out2", _calibration())
    assert not (tmp_path / "out2").exists()
    with pytest.raises(BitsmithError, match="no such model directory"):
        quantize_offloaded(tmp_path / "missing", _config("rtn"), tmp_path / "out3", _calibration())


def test_block_inputs_hold_no_kv_cache(checkpoint):
    """Running a block twice on the kept inputs gives the same output: no KV cache grows across runs
    (transformers passes one down the blocks; it would make later runs attend to stale keys)."""
    from bitsmith.pipeline.calibration import run_batch
    from bitsmith.pipeline.blocks import capture_inputs as _capture_inputs, run_block as _run_block

    model, _ = checkpoint
    inputs = _capture_inputs(model, model.model.layers[0], _calibration()[:1], run_batch)
    first = _run_block(model.model.layers[0], inputs)[0][0][0]
    second = _run_block(model.model.layers[0], inputs)[0][0][0]
    assert torch.equal(first, second)


def test_cli_compress_offload(checkpoint, tmp_path):
    """`bitsmith compress DIR --offload` calibrates on text through the model's own tokenizer."""
    import subprocess
    import sys

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    _, path = checkpoint
    model_dir = shutil.copytree(path, tmp_path / "with-tokenizer")
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(255)} | {"[UNK]": 255}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(model_dir)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(" ".join(f"w{(i * j) % 255}" for i in range(300)) for j in range(1, 5)))
    proc = subprocess.run([sys.executable, "-m", "bitsmith.cli.main", "compress", str(model_dir), "--recipe",
                           "gptq-w4a16", "--offload", "--calib", str(calib), "--out", str(tmp_path / "out"), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["blocks"] == 3 and result["quantized_layers"] == 22  # lm_head stays float and result["peak_rss_bytes"] > 0
    assert bitsmith.load(tmp_path / "out").model.layers[2].mlp.down_proj.bits == 4
    source = json.loads((tmp_path / "out" / "bitsmith.json").read_text())["source"]
    assert source["path"] == str(model_dir.resolve())  # so that `bitsmith eval` finds the float original
