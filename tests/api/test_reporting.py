"""Nothing silent: every layer not quantized as asked appears, with its reason, in the report, the compress
table, bitsmith.json and inspect; labels say what was done. And compressed-from-disk models load on meta."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import bitsmith
from bitsmith.algorithms.gptq import gptq_quantize
from bitsmith.recipe import GPTQOptions, config_from_dict
from bitsmith.stages.gptq import gptq_note


class _Experts(nn.Module):
    """Two experts where every token goes to expert 0: expert 1 never sees calibration data (an MoE's lot)."""

    def __init__(self):
        super().__init__()
        self.expert0, self.expert1 = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return x + self.expert0(x)


class _Router(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_Experts() for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _gptq_config():
    return config_from_dict({"rules": [
        {"targets": ["Linear"], "scheme": {"weights": {"dtype": "int4", "granularity": 32, "symmetric": False,
                                                       "algorithm": "gptq"}}}]})


def test_a_layer_without_calibration_data_is_rounded_and_says_so():
    torch.manual_seed(0)
    model = _Router()
    report = bitsmith.quantize_(model, _gptq_config(), calibration=[torch.randn(8, 32) for _ in range(2)])
    assert report.quantized["layers.0.expert0"] == "w4 g32 asym a16 gptq"
    assert report.quantized["layers.0.expert1"] == "w4 g32 asym a16"  # the label says round-to-nearest
    assert report.notes["layers.0.expert1"] == "saw no calibration data: round-to-nearest instead of gptq"
    assert "layers.0.expert0" not in report.notes


def test_gptq_notes_from_its_info():
    torch.manual_seed(0)
    weight = torch.randn(16, 64)
    hessian = -torch.eye(64)  # negative definite: 1% damping is not enough, 1000x is
    _, info = gptq_quantize(weight, hessian, 4, 32, False)
    done, note = gptq_note(info, GPTQOptions())
    assert done == "gptq" and note == "damping escalated from 0.01 to 10 of mean(diag H) (Hessian not positive definite)"
    assert gptq_note({"fallback": "diagonal"}, GPTQOptions())[1].startswith("Hessian not positive definite at any")
    x = torch.randn(8, 64)
    x[:, :3] = 0  # three inputs never active
    _, info = gptq_quantize(weight, 2 / 8 * x.T @ x, 4, 32, False, damp_percent=0.0)  # 8 rows for 64 inputs
    done, note = gptq_note(info, GPTQOptions(damp_percent=0.0))
    assert "damping escalated from 0 to 0.01" in note and "3 inputs were 0 in every calibration row" in note


def test_notes_reach_the_table_bitsmith_json_and_inspect(tmp_path, docs_lm_model, docs_lm_text):
    """docs-lm under AWQ: its grouped-query v_proj -> o_proj cannot take a scale (widths 128 vs 256), so each
    o_proj gets the clipping search only, and says so everywhere a user looks."""
    calib = tmp_path / "calib.txt"
    from bitsmith.zoo.docs_lm import calibration_texts

    calib.write_text("\n".join(calibration_texts(8)))
    run = lambda *a: subprocess.run([sys.executable, "-m", "bitsmith.cli.main", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, timeout=900)
    done = run("compress", "docs-lm", "--recipe", "awq-w4a16", "--out", tmp_path / "m", "--calib", calib,
               "--calib-samples", "8", "--repeats", "1", "--text", docs_lm_text)
    assert done.returncode == 0, done.stderr
    o_proj = "model.layers.0.self_attn.o_proj"
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith(f"note: {o_proj} "))
    assert "widths differ (128 vs [256])" in line and "clipping search only" in line
    meta = json.loads((tmp_path / "m" / "bitsmith.json").read_text())
    assert "widths differ" in meta["notes"][o_proj] and meta["quantized"][o_proj] == "w4 g128 asym a16 awq"
    assert "lm_head" not in meta["quantized"]  # the recipe keeps it in float: asked, so not a note
    inspected = json.loads(run("inspect", tmp_path / "m", "--json").stdout)
    assert inspected["notes"][o_proj] == meta["notes"][o_proj]
    row = next(r for r in inspected["layers"] if r["name"] == o_proj)
    assert row["note"] == meta["notes"][o_proj]


def test_offloaded_output_loads_on_meta_and_inspects_and_evaluates(tmp_path, docs_lm_model, docs_lm_text):
    """compress --offload output: inspect and eval work on it, and load builds the model with its parameters
    on the meta device (no float copy of the model) before the quantized tensors are bound."""
    from bitsmith.io import serialization

    run = lambda *a: subprocess.run([sys.executable, "-m", "bitsmith.cli.main", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, timeout=900)
    done = run("compress", "docs-lm", "--recipe", "w4a16", "--offload", "--out", tmp_path / "off", "--json")
    assert done.returncode == 0, done.stderr
    meta = serialization.read_metadata(tmp_path / "off")
    assert len(meta["files"]) == 5  # four blocks and the rest
    skeleton = serialization._skeleton(tmp_path / "off", meta)
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    inspected = run("inspect", tmp_path / "off", "--json")
    assert inspected.returncode == 0, inspected.stderr
    info = json.loads(inspected.stdout)
    assert info["file_bytes"] == sum(f["bytes"] for f in meta["files"].values()) and len(info["layers"]) == 30
    evaluated = run("eval", tmp_path / "off", "--repeats", "1", "--text", docs_lm_text, "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)
    in_memory = copy.deepcopy(docs_lm_model[0])
    bitsmith.quantize_(in_memory, bitsmith.load_recipe("w4a16"))
    loaded = bitsmith.load(tmp_path / "off")
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    ids = torch.arange(64)[None]
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, in_memory(input_ids=ids).logits)
    assert 0 < metrics["perplexity_increase_pct"] < 2.0  # measured 0.2%
