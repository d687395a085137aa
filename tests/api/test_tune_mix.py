"""bitsmith tune's per-layer phases on the real MiniLM (first block only, to keep it quick): mixes found by
bisection over the budget, the INC-style greedy fallback, blocking layers, and the same choice from the same log."""

import json

import pytest

import bitsmith.api.tune as tune_module
from bitsmith import load_recipe
from bitsmith.api.tune import tune
from conftest import run_cli

LAYER0 = r"encoder\.layer\.0\."
CANDIDATES = ["w8a16", "w4a16"]
TARGET = "cosine>=0.9995"


def _mix(out, **kwargs):
    options = dict(calib_samples=8, repeats=1, mix_candidates=CANDIDATES, layers=LAYER0, mix_rounds=2) | kwargs
    return tune("minilm", TARGET, "size", out, [], **options)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune-mix")
    return _mix(out), out


def test_mixes_follow_the_bisection_and_each_is_measured(mixed):
    result, out = mixed
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()[1:]]
    mixes = [row for row in rows if row.get("phase") == "mix"]
    assert mixes[0]["fraction"] == 0.5 and 1 <= len(mixes) <= 2 and len({row["name"] for row in mixes}) == len(mixes)
    met = mixes[0]["metrics"]["mean_cosine"] >= 0.9995
    if len(mixes) == 2:  # the second halves the interval the first's measured result left open
        assert mixes[1]["fraction"] == (0.25 if met else 0.75)
    # else the second round chose the same mix as the first: it was read from the log, not run again
    for row in mixes:
        layers = {layer for stage in row["recipe"]["stages"] for rule in stage["quantize"]["rules"]
                  for layer in rule["targets"]}
        assert layers and all(layer.startswith("encoder.layer.0.") for layer in layers)
        assert set(row["choice"]) == {name for name in row["choice"] if name.startswith("encoder.layer.0.")}
        assert len(row["choice"]) == 6
    sensitivity = json.loads((out / "sensitivity.json").read_text())
    assert sensitivity["candidates"] == CANDIDATES and len(sensitivity["rows"]) == 12
    assert result["sensitivity"]["harm_from"] == "measured" and result["sensitivity"]["note"]
    # for size every candidate here stores fewer bytes than float on every layer: none is without a saving
    assert result["no_saving"] == [] and result["workers"] == result["workers_asked"] == 1
    assert result["trial_seconds"] == pytest.approx(sum(row["seconds"] for row in rows), abs=0.2)


def test_a_larger_budget_keeps_more_bytes_and_the_best_is_the_smallest_meeting(mixed):
    result, out = mixed
    trials = sorted((t for t in result["trials"] if t.get("phase") == "mix"), key=lambda t: t["fraction"])
    assert all(a["bytes"] <= b["bytes"] for a, b in zip(trials, trials[1:]))
    meeting = [t for t in result["trials"] if t["mean_cosine"] >= 0.9995]
    if meeting:
        assert result["best"] == min(meeting, key=lambda t: (t["bytes"], t["name"]))["name"]
        assert load_recipe(str(out / "recipe.yaml")).to_dict()["stages"]
        saved = json.loads((out / "model" / "bitsmith.json").read_text())
        assert saved["metrics"]["recipe"] == result["best"]
    else:
        assert result["blocking"] is not None


def test_the_same_log_gives_the_same_choice_without_running_a_trial(mixed, monkeypatch):
    result, out = mixed

    def no_trials(*args, **kwargs):
        raise AssertionError("a trial in the log ran again")

    monkeypatch.setattr(tune_module, "compress", no_trials)
    monkeypatch.setattr(tune_module, "analyze_sensitivity", no_trials)  # the table comes from sensitivity.json
    assert _mix(out) == result


def test_an_unreachable_target_names_the_layers_that_block_it(mixed, capsys):
    _, out = mixed
    code, _, err = run_cli(capsys, "tune", "minilm", "--target", "cosine>=0.99999999", "--objective", "size", "--out",
                           out, "--space", "", "--mix-candidates", ",".join(CANDIDATES), "--layers", LAYER0,
                           "--mix-rounds", "1", "--calib-samples", "8", "--repeats", "1")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "no recipe met cosine>=0.99999999" in lines[0], err
    assert "layers no cheaper option of which alone meets it: encoder.layer.0." in lines[0]


def test_greedy_returns_the_most_harmful_layers_to_float_until_the_target_holds(mixed, tmp_path):
    _, out = mixed
    (tmp_path / "sensitivity.json").write_text((out / "sensitivity.json").read_text())  # the same table
    result = _mix(tmp_path, strategy="greedy", greedy_trials=2, save_model=False)
    table = json.loads((tmp_path / "sensitivity.json").read_text())
    harm = {row["group"]: row["measured"] for row in table["rows"] if row["candidate"] == "w4a16"}
    order = sorted(harm, key=lambda layer: (-harm[layer], layer))
    rows = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()[1:]]
    assert [row["float_layers"] for row in rows] == [order[:k] for k in range(len(rows))]
    cosines = [row["metrics"]["mean_cosine"] for row in rows]
    assert all(c < 0.9995 for c in cosines[:-1])  # it stops at the first that meets the target
    assert result["met"] == (cosines[-1] >= 0.9995)
