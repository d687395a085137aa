"""compressed-tensors exports of pruned docs-lm: sparse-bitmask and sparse-24-bitmask decompressed by
compressed-tensors' own code (0.14, the last release that has it, run in a child process) to the pruned weights
bit for bit; the config as its config classes dump it; what the default and the quantized cases write and say;
bitsmith reading its sparse exports back; corrupt sparse tensors refused."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import bitsmith
from conftest import run_cli as _cli
from bitsmith import BitsmithError
from bitsmith.export.llm_formats import export_compressed_tensors
from bitsmith.io.compressed_tensors import load_compressed_tensors
from bitsmith.recipe import PruneConfig, config_from_dict

CT014 = Path(sys.prefix) / "anchors" / "compressed-tensors-0.14"
IDS = torch.arange(3, 35)[None]  # (1, 32) token ids

# compressed-tensors 0.14's ModelCompressor: its sparsity compressor alone, then the whole model decompressed
CHILD = """
import sys, torch, transformers, compressed_tensors
from safetensors.torch import save_file
from compressed_tensors.compressors import ModelCompressor
assert compressed_tensors.__version__.startswith("0.14"), compressed_tensors.__file__
path, out = sys.argv[1], sys.argv[2]
compressor = ModelCompressor.from_pretrained(path)
sparse = dict(compressor.sparsity_compressor.decompress(path))
model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))
compressor.decompress(path, model)
tensors = {"sparse/" + k: v.contiguous() for k, v in sparse.items()}
tensors.update({"model/" + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()})
save_file(tensors, out)
print(type(compressor.sparsity_compressor).__name__)
"""


def _pruned(model, pattern=None):
    rule = {"targets": ["Linear"], **({"pattern": pattern} if pattern else {"sparsity": 0.5})}
    pruned = copy.deepcopy(model)
    config = config_from_dict({"method": "magnitude", "rules": [rule], "ignore": ["lm_head"]}, PruneConfig)
    bitsmith.prune_(pruned, config)
    return pruned


def _logits(model):
    with torch.inference_mode():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def exports(docs_lm_model, tmp_path_factory):
    """{pattern: (pruned model, its sparse compressed-tensors export, what the export returned)}."""
    model, tokenizer = docs_lm_model
    root, out = tmp_path_factory.mktemp("ct-sparse"), {}
    for pattern in ("unstructured", "2:4"):
        pruned = _pruned(model, None if pattern == "unstructured" else pattern)
        result = export_compressed_tensors(pruned, tokenizer, root / pattern, sparse="bitmask")
        out[pattern] = (pruned, root / pattern, result)
    return out


@pytest.mark.skipif(not (CT014 / "compressed_tensors").is_dir(),
                    reason="compressed-tensors 0.14 is not installed beside the environment (make test installs it)")
@pytest.mark.parametrize("pattern, compressor", [("unstructured", "BitmaskCompressor"),
                                                 ("2:4", "Sparse24BitMaskCompressor")])
def test_compressed_tensors_decompresses_the_export_bit_exactly(exports, tmp_path, pattern, compressor):
    pruned, directory, _ = exports[pattern]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CT014), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, "-W", "ignore", "-c", CHILD, str(directory), str(tmp_path / "out.safetensors")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == compressor
    theirs = load_file(tmp_path / "out.safetensors")
    state = pruned.state_dict()
    targets = json.loads((directory / "config.json").read_text())["quantization_config"]["sparsity_config"]["targets"]
    assert len(targets) == 28  # every Linear of the 4 blocks
    for name in targets:
        assert torch.equal(theirs[f"sparse/{name}.weight"], state[f"{name}.weight"]), name
    for key, tensor in state.items():  # the whole model, as ModelCompressor.decompress leaves it
        assert torch.equal(theirs[f"model/{key}"], tensor), key


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsity_config_is_what_compressed_tensors_writes(exports, pattern):
    config = pytest.importorskip("compressed_tensors.config")
    pruned, directory, result = exports[pattern]
    written = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert written == result["quantization_config"] and set(written) == {"quant_method", "sparsity_config"}
    sparsity = written["sparsity_config"]
    theirs = config.SparsityCompressionConfig.load_from_registry(sparsity["format"], **{
        k: v for k, v in sparsity.items() if k != "format"}).model_dump()
    assert theirs == sparsity  # (config.json is written with sorted keys, by compressed-tensors too)
    assert sparsity["format"] == ("sparse-bitmask" if pattern == "unstructured" else "sparse-24-bitmask")
    assert sparsity["sparsity_structure"] == ("unstructured" if pattern == "unstructured" else "2:4")
    assert 0.29 < sparsity["global_sparsity"] < 0.31  # 0.300: half of the blocks' 3.15M weights, of 5.25M parameters
    tensors = load_file(directory / "model.safetensors")
    down = "model.layers.0.mlp.down_proj"
    assert f"{down}.weight" not in tensors and tensors[f"{down}.bitmask"].shape == (256, 96)
    if pattern == "2:4":
        assert tensors[f"{down}.compressed"].shape == (256, 384) and tensors[f"{down}.shape"].tolist() == [[256], [768]]
        assert f"{down}.row_offsets" not in tensors
    else:
        assert tensors[f"{down}.compressed"].dim() == 1 and tensors[f"{down}.shape"].tolist() == [256, 768]
    assert "written as " + sparsity["format"] in result["notes"][0] and "random weights" in result["notes"][0]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_bitsmith_reads_its_sparse_exports_back(exports, pattern):
    pruned, directory, _ = exports[pattern]
    loaded = load_compressed_tensors(directory)
    assert torch.equal(_logits(loaded), _logits(pruned))
    up = "model.layers.2.mlp.up_proj.weight"
    assert torch.equal(bitsmith.load(directory).get_parameter(up), pruned.get_parameter(up))


def test_default_keeps_float_sparse_layers_dense_and_says_why(docs_lm_model, tmp_path):
    pruned = _pruned(docs_lm_model[0])
    with pytest.raises(BitsmithError, match=r"quantize it first .*; or write its sparse layers as sparse-bitmask"):
        export_compressed_tensors(pruned, docs_lm_model[1], tmp_path / "float")
    assert not (tmp_path / "float").exists()
    bitsmith.quantize_(pruned, bitsmith.load_recipe("w4a16"))  # round-to-nearest keeps the zeros
    result = export_compressed_tensors(pruned, docs_lm_model[1], tmp_path / "w4", sparse="bitmask")
    config = json.loads((tmp_path / "w4" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and "sparsity_config" not in config
    assert result["notes"] == ["28 pruned layers (50% zeros) written quantized only (pack-quantized, each zero a"
                               " zero-point code): compressed-tensors has no sparse form of packed integer weights"]


def test_quantized_and_float_sparse_layers_together_stay_dense(docs_lm_model, tmp_path):
    """compressed-tensors 0.14 cannot decompress sparse-bitmask beside pack-quantized layers: written dense."""
    pruned = _pruned(docs_lm_model[0])
    mlp_int4 = {"rules": [{"targets": ["re:.*mlp.*"], "scheme": {"weights": {"dtype": "int4", "granularity": 128}}}]}
    bitsmith.quantize_(pruned, bitsmith.QuantizeConfig.model_validate(mlp_int4))
    result = export_compressed_tensors(pruned, docs_lm_model[1], tmp_path / "mixed", sparse="bitmask")
    assert "sparsity_config" not in result["quantization_config"]
    assert result["notes"][0].startswith("16 sparse float layers (50% zeros) written dense: compressed-tensors (0.14")
    assert result["notes"][1].startswith("12 pruned layers (50% zeros) written quantized only")
    tensors = load_file(tmp_path / "mixed" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(tensors[q], pruned.get_parameter(q))


def _corrupt(exports, tmp_path, change):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(exports["unstructured"][1], broken)
    tensors = load_file(broken / "model.safetensors")
    change(tensors)
    save_file(tensors, broken / "model.safetensors")
    return broken


Q = "model.layers.1.self_attn.q_proj"
CORRUPT = {
    "one value short": (lambda t: t.update({f"{Q}.compressed": t[f"{Q}.compressed"][:-1].clone()}),
                        rf"layer '{Q}' in .*: the bitmask keeps (\d+) elements but \d+ values are stored"),
    "row offsets": (lambda t: t[f"{Q}.row_offsets"].add_(1), "its row_offsets do not match its bitmask"),
    "shape": (lambda t: t.update({f"{Q}.shape": torch.tensor([256, 200])}),
              r"a bitmask of a \[256, 200\] tensor is uint8 \[256, 25\], got uint8 \[256, 32\]"),
    "no values": (lambda t: t.pop(f"{Q}.compressed"), f"layer '{Q}' in .* has a bitmask but no shape or compressed"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_sparse_exports_are_refused(exports, tmp_path, case):
    change, message = CORRUPT[case]
    broken = _corrupt(exports, tmp_path, change)
    with pytest.raises(BitsmithError, match=message) as caught:
        load_compressed_tensors(broken)
    assert "\n" not in str(caught.value)


def test_cli_export_sparse_option(docs_lm_model, tmp_path, capsys):
    bitsmith.save(_pruned(docs_lm_model[0]), tmp_path / "pruned", tokenizer=docs_lm_model[1])
    code, out, err = _cli(capsys, "export", tmp_path / "pruned", "--format", "compressed-tensors", "--sparse", "bitmask",
                          "--out", tmp_path / "ct")
    assert code == 0, err
    assert "note: 28 sparse float layers (50% zeros) written as sparse-bitmask: compressed-tensors <= 0.14" in out
    code, out, err = _cli(capsys, "export", tmp_path / "pruned", "--format", "compressed-tensors", "--sparse", "csr",
                          "--out", tmp_path / "bad")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "unknown sparse storage 'csr'" in lines[0], err
    assert not (tmp_path / "bad").exists()
