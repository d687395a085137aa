"""inspect on pruned docs-lm: each layer's fraction of zero weights, its N:M pattern, its storage, and that no
kernel computes on the sparse form; float Linears get rows when pruned; dense models show no sparse layer."""

import copy
import json
import sys

import pytest

import bitsmith
from bitsmith.api.inspect import SPARSE_KERNEL, inspect_checkpoint
from bitsmith.recipe import PruneConfig, config_from_dict


def _pruned(model, pattern):
    rule = {"targets": ["Linear"], **({"pattern": pattern} if pattern != "unstructured" else {"sparsity": 0.5})}
    pruned = copy.deepcopy(model)
    bitsmith.prune_(pruned, config_from_dict({"method": "magnitude", "rules": [rule], "ignore": ["lm_head"]},
                                             PruneConfig))
    return pruned


@pytest.fixture(scope="module")
def checkpoints(docs_lm_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect-sparse")
    sparse_int4 = _pruned(docs_lm_model[0], "unstructured")
    bitsmith.quantize_(sparse_int4, bitsmith.load_recipe("w4a16"))
    models = {"sparse-int4": sparse_int4, "2:4-float": _pruned(docs_lm_model[0], "2:4"),
              "dense-int4": copy.deepcopy(docs_lm_model[0])}
    bitsmith.quantize_(models["dense-int4"], bitsmith.load_recipe("w4a16"))
    for name, model in models.items():
        bitsmith.save(model, root / name)
    return root


def test_sparse_int4_layers(checkpoints):
    info = inspect_checkpoint(checkpoints / "sparse-int4")
    rows = {row["name"]: row for row in info["layers"]}
    down = rows["model.layers.3.mlp.down_proj"]
    assert down["module"] == "IntxWeightOnlyLinear" and down["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert down["pattern"] == "unstructured" and down["storage"].startswith("bitmask (")
    assert down["sparse_kernel"] == SPARSE_KERNEL and SPARSE_KERNEL.startswith("none: computed by the dense kernels")
    head = rows["lm_head"]  # int4 but not pruned: its codes sit at their zero point ~10% of the time
    assert 0.05 < head["sparsity"] < 0.2 and "pattern" not in head  # 0.12
    assert sum("sparse_kernel" in row for row in rows.values()) == 28


def test_2of4_float_layers_get_rows_and_the_cli_says_so(checkpoints, capsys):
    from bitsmith.cli.main import main

    info = inspect_checkpoint(checkpoints / "2:4-float")
    sparse = [row for row in info["layers"] if row.get("sparse_kernel")]
    assert len(sparse) == 28 and {row["module"] for row in sparse} == {"Linear"}
    assert {row["pattern"] for row in sparse} == {"2:4"} and all(row["sparsity"] == 0.5 for row in sparse)
    assert all(row["storage"].startswith("bitmask") and row["bits"] == 32 for row in sparse)
    argv, sys.argv = sys.argv, ["bitsmith", "inspect", str(checkpoints / "2:4-float")]
    try:
        main()
    except SystemExit as stop:
        assert stop.code in (0, None)
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert f"sparse layers: 28, 28 stored as a bitmask; sparse kernel: {SPARSE_KERNEL}" in out
    assert "50% 2:4" in out


def test_dense_models_show_no_sparse_layer(checkpoints):
    info = inspect_checkpoint(checkpoints / "dense-int4")
    assert not any("pattern" in row for row in info["layers"]) and len(info["layers"]) == 30
    assert all(row["module"] != "Linear" for row in info["layers"])
    json.dumps(info)  # --json prints it as it is
