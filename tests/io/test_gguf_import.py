"""GGUF import: docs-lm checkpoints exported to GGUF and read back with load_model keep every matrix's codes,
scales (and Q4_1 mins) exactly and give the same logits; inspect and eval take the file; a truncated file, another
architecture and another block type are each one line and exit 2."""

import copy

import gguf
import numpy as np
import pytest
import torch

import bitsmith
from bitsmith.api.export import export_checkpoint
from bitsmith.formats.gguf_blocks import dequantize
from bitsmith.io.models import load_model
from bitsmith.nn import IntxMinWeightOnlyLinear
from conftest import run_cli

pytest.importorskip("transformers")

HEADS, KV_HEADS = 4, 2  # docs-lm


def _rules(dtype: str) -> dict:
    scheme = {"weights": {"dtype": dtype, "granularity": 32, "symmetric": True}}
    return {"rules": [{"targets": ["Embedding"], "scheme": scheme}, {"targets": ["Linear"], "scheme": scheme}]}


@pytest.fixture(scope="module")
def files(docs_lm_model, tmp_path_factory):
    """{name: (checkpoint directory or None, .gguf file)}: int4 / int8 g32 symmetric checkpoints (exported exactly
    as Q4_0 / Q8_0) and the float docs-lm exported as Q4_1."""
    model, tokenizer = docs_lm_model
    root, out = tmp_path_factory.mktemp("gguf-import"), {}
    for name, dtype in (("q4_0", "int4"), ("q8_0", "int8")):
        quantized = copy.deepcopy(model)
        bitsmith.quantize_(quantized, bitsmith.QuantizeConfig.model_validate(_rules(dtype)))
        bitsmith.save(quantized, root / name, tokenizer=tokenizer)
        export_checkpoint(root / name, "gguf", root / f"{name}.gguf")
        out[name] = root / name, root / f"{name}.gguf"
    bitsmith.save(model, root / "float", tokenizer=tokenizer)
    export_checkpoint(root / "float", "gguf", root / "q4_1.gguf", gguf_type="q4_1")
    out["q4_1"] = None, root / "q4_1.gguf"
    # llama.cpp's own Q4_0 rounding (the gguf package's reference): d = max / -8, negative in about half the blocks
    export_checkpoint(root / "float", "gguf", root / "rtn_q4_0.gguf", gguf_type="q4_0")
    out["rtn_q4_0"] = None, root / "rtn_q4_0.gguf"
    return out


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("name", ["q4_0", "q8_0"])
def test_codes_scales_and_logits_equal_the_checkpoints(files, name):
    checkpoint, path = files[name]
    loaded, original = load_model(path), bitsmith.load(checkpoint)
    assert loaded.compressed and loaded.source == {"kind": "gguf", "path": str(path.resolve())}
    imported = dict(loaded.model.named_modules())
    compared = 0
    for module_name, module in original.named_modules():
        if hasattr(module, "weight_scale"):  # every quantized matrix, the embedding included
            twin = imported[module_name]
            assert type(twin) is type(module), module_name
            assert twin.bits == module.bits == (4 if name == "q4_0" else 8)
            assert torch.equal(twin.codes(), module.codes()), module_name  # q/k rows back in transformers' order
            assert torch.equal(twin.weight_scale, module.weight_scale), module_name
            assert torch.equal(twin.weight_zero_point, module.weight_zero_point), module_name
            compared += 1
    assert compared == 4 * 7 + 2  # 7 matrices a block, embedding, lm_head
    ids = loaded.tokenizer("bitsmith compresses models for the CPU.", return_tensors="pt")["input_ids"]
    assert torch.equal(ids, original_ids(checkpoint, ids))
    difference = (_logits(loaded.model, ids) - _logits(original, ids)).abs().max().item()
    assert difference <= 1e-6  # 0.0 measured: the same codes on the same kernels


def original_ids(checkpoint, ids):
    """The ids the checkpoint's own tokenizer gives the same text: the GGUF's tokenizer must agree."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)("bitsmith compresses models for the CPU.",
                                                     return_tensors="pt")["input_ids"]


def test_llama_cpps_negative_block_scales_are_kept_and_survive_save_and_load(files, tmp_path):
    _, path = files["rtn_q4_0"]
    loaded = load_model(path)
    scales = [m.weight_scale for m in loaded.model.modules() if hasattr(m, "weight_scale")]
    negative = sum(int((s < 0).sum()) for s in scales) / sum(s.numel() for s in scales)
    assert 0.3 < negative < 0.7, negative
    bitsmith.save(loaded.model, tmp_path / "saved", tokenizer=loaded.tokenizer)
    again = bitsmith.load(tmp_path / "saved")
    ids = loaded.tokenizer("bitsmith compresses models.", return_tensors="pt")["input_ids"]
    assert torch.equal(_logits(again, ids), _logits(loaded.model, ids))


def test_q4_1_keeps_the_files_blocks(files):
    _, path = files["q4_1"]
    loaded = load_model(path)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    modules = dict(loaded.model.named_modules())
    down = modules["model.layers.0.mlp.down_proj"]  # not q/k: rows in the file's order
    assert isinstance(down, IntxMinWeightOnlyLinear)
    blocks = np.asarray(tensors["blk.0.ffn_down.weight"].data).reshape(-1, 20)
    codes = np.concatenate([blocks[:, 4:] & 15, blocks[:, 4:] >> 4], axis=1).reshape(down.out_features, -1)
    assert np.array_equal(down.codes().numpy(), codes)
    assert np.array_equal(down.weight_scale.numpy().ravel(), blocks[:, 0:2].copy().view(np.float16).ravel())
    assert np.array_equal(down.weight_min.numpy().ravel(), blocks[:, 2:4].copy().view(np.float16).ravel())
    # its float32 weight is the gguf dequantizer's, bit for bit
    assert np.array_equal(down.dequantize().numpy(), dequantize(np.asarray(tensors["blk.0.ffn_down.weight"].data),
                                                                "q4_1"))
    assert "model.embed_tokens" in loaded.meta["notes"]  # Q4_1 embedding: dequantized, said
    # exported again, its Q4_1 matrices are the file's blocks, byte for byte (not rounded a second time)
    from bitsmith.export.gguf import export_gguf

    again = path.parent / "q4_1-again.gguf"
    export_gguf(loaded.model, loaded.tokenizer, again, gguf_type="q8_0")
    retensors = {t.name: t for t in gguf.GGUFReader(again).tensors}
    assert retensors["blk.0.ffn_down.weight"].tensor_type.name == "Q4_1"
    assert np.array_equal(np.asarray(retensors["blk.0.ffn_down.weight"].data),
                          np.asarray(tensors["blk.0.ffn_down.weight"].data))
    ids = loaded.tokenizer("bitsmith compresses models.", return_tensors="pt")["input_ids"]
    assert torch.isfinite(_logits(loaded.model, ids)).all()


def test_inspect_and_eval_take_the_file(files, capsys, docs_lm_text):
    _, path = files["q4_0"]
    code, out, err = run_cli(capsys, "inspect", path)
    assert code == 0, err
    assert "IntxWeightOnlyLinear" in out and "model.layers.3.mlp.down_proj" in out
    code, out, err = run_cli(capsys, "eval", path, "--repeats", "1", "--text", docs_lm_text)
    assert code == 0, err
    assert "perplexity" in out.lower()


def _assert_one_line(capsys, path, *words):
    code, out, err = run_cli(capsys, "inspect", path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0]


def test_truncated_file_is_one_line(files, tmp_path, capsys):
    data = files["q8_0"][1].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    _assert_one_line(capsys, cut, "truncated or corrupt")


def _written(out, architecture="llama", retype=None):
    """A small GGUF file of ``architecture``, with the tensor ``retype`` stored as Q6_K when given."""
    writer = gguf.GGUFWriter(out, architecture)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    if retype:
        writer.add_tensor(retype, np.zeros((8, 210), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_other_architecture_is_one_line(tmp_path, capsys):
    path = _written(tmp_path / "qwen.gguf", architecture="qwen2")
    _assert_one_line(capsys, path, "'qwen2'", "llama")


def test_other_block_type_is_one_line(tmp_path, capsys):
    path = _written(tmp_path / "q6k.gguf", retype="blk.0.ffn_down.weight")
    _assert_one_line(capsys, path, "blk.0.ffn_down.weight", "Q6_K")
