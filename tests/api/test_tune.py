"""bitsmith tune on the real MiniLM: trials measured for real, the front, the choice, the resumable log."""

import json

import pytest

import bitsmith.api.tune as tune_module
from bitsmith import BitsmithError, load_recipe
from bitsmith.api.tune import parse_target, tune
from conftest import run_cli

SPACE = ["bf16", "w8a16", "w8a8-dynamic"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    return tune("minilm", "cosine>=0.999", "size", out, SPACE, calib_samples=16, repeats=1, mix=False), out


def test_the_best_recipe_meets_the_target_with_the_least_objective(searched):
    result, out = searched
    trials = {t["name"]: t for t in result["trials"]}
    assert set(trials) == set(SPACE)
    meeting = [t for t in trials.values() if t["mean_cosine"] >= 0.999]
    assert result["met"] and result["best"] == min(meeting, key=lambda t: t["bytes"])["name"]
    assert trials["w8a16"]["bytes"] < 0.6 * trials["bf16"]["bytes"]  # int8 codes against 16-bit weights
    assert load_recipe(str(out / "recipe.yaml")).to_dict() == load_recipe(result["best"]).to_dict()
    assert json.loads((out / "tune.json").read_text()) == result


def test_the_front_holds_exactly_the_undominated_trials(searched):
    result, _ = searched
    trials = result["trials"]
    for cost, front in (("bytes", "front_size"), ("latency_ratio", "front_latency")):
        for t in trials:
            dominated = any(o[cost] <= t[cost] and o["mean_cosine"] >= t["mean_cosine"]
                            and (o[cost] < t[cost] or o["mean_cosine"] > t["mean_cosine"]) for o in trials)
            assert (t["name"] in result[front]) == (not dominated), (cost, t)


def test_a_finished_log_is_reused_and_gives_the_same_choice(searched, monkeypatch):
    result, out = searched

    def no_trials(*args, **kwargs):
        raise AssertionError("a trial in the log ran again")

    monkeypatch.setattr(tune_module, "compress", no_trials)
    again = tune("minilm", "cosine>=0.999", "size", out, SPACE, calib_samples=16, repeats=1, mix=False)
    assert again == result  # the saved best model is kept too: it is that recipe's
    latency = tune("minilm", "cosine>=0.999", "latency", out, SPACE, calib_samples=16, repeats=1, mix=False,
                   save_model=False)
    assert latency["best"] == min((t for t in result["trials"] if t["mean_cosine"] >= 0.999),
                                  key=lambda t: t["latency_ratio"])["name"]


def test_an_interrupted_search_resumes_without_repeating_a_trial(searched, tmp_path, monkeypatch):
    _, out = searched
    lines = (out / "trials.jsonl").read_text().splitlines()
    # the header, the first two trials, and half of the third's row: killed while writing it
    (tmp_path / "trials.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    ran = []
    real = tune_module.compress
    monkeypatch.setattr(tune_module, "compress", lambda model, recipe, **kw: ran.append(recipe.name) or real(
        model, recipe, **kw))
    resumed = tune("minilm", "cosine>=0.999", "size", tmp_path, SPACE, calib_samples=16, repeats=1, mix=False,
                   save_model=False)
    assert ran == SPACE[2:] and len(resumed["trials"]) == 3


@pytest.mark.parametrize("text,fragment", [
    ("cos>=0.9", "unknown metric 'cos'"),
    ("cosine<=0.9", "cosine is better higher: write cosine>=0.9"),
    ("cosine", "is not METRIC>=VALUE"),
])
def test_targets_written_wrong_are_refused(text, fragment):
    with pytest.raises(BitsmithError, match=fragment):
        parse_target(text)


@pytest.mark.parametrize("args,fragment", [
    (["--target", "perplexity_increase<=1"], "its target is cosine, not perplexity_increase"),
    (["--target", "cosine>=0.999", "--objective", "speed"], "--objective must be"),
    (["--target", "cosine>=0.999", "--space", "w5a5"], "unknown recipe 'w5a5'"),
    (["--target", "cosine>=0.999", "--space", ",", "--no-mix"], "--space names no recipe"),
    (["--target", "cosine>=0.999", "--strategy", "random"], "--strategy must be pareto or greedy"),
    (["--target", "cosine>=0.999", "--workers", "0"], "--workers must be a whole number of at least 1"),
    (["--target", "cosine>=0.999", "--mix-rounds", "0"], "--mix-rounds must be a whole number of at least 1"),
    (["--target", "cosine>=0.999", "--mix-base", "sparsegpt-50-w4a16"], "give a quantize-only recipe"),
])
def test_bad_tune_input_is_one_clear_line(capsys, tmp_path, args, fragment):
    code, _, err = run_cli(capsys, "tune", "minilm", "--out", tmp_path / "t", *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not (tmp_path / "t").exists()


def test_unmet_targets_and_other_models_logs_are_one_clear_line(capsys, searched, tmp_path):
    _, searched_out = searched
    out = tmp_path / "tune"  # the log alone: an unmet target removes the saved model, which other tests reuse
    out.mkdir()
    (out / "trials.jsonl").write_text((searched_out / "trials.jsonl").read_text())
    code, _, err = run_cli(capsys, "tune", "minilm", "--target", "cosine>=0.9999999", "--out", out, "--space",
                           ",".join(SPACE), "--calib-samples", "16", "--repeats", "1", "--no-mix")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "no recipe met cosine>=0.9999999; closest: bf16" in lines[0], err
    code, _, err = run_cli(capsys, "tune", "digits-cnn", "--target", "accuracy_drop<=1", "--out", out)
    assert code == 2 and "was made for another model ('minilm')" in err


def test_cli_table_marks_the_best_and_the_fronts(capsys, searched):
    result, out = searched
    code, stdout, _ = run_cli(capsys, "tune", "minilm", "--target", "cosine>=0.999", "--objective", "size", "--out",
                              out, "--space", ",".join(SPACE), "--calib-samples", "16", "--repeats", "1", "--no-mix")
    assert code == 0 and f"{result['best']} (best)" in stdout and "recipe written to" in stdout
    assert f"model in {out / 'model'}" in stdout


def test_trials_on_ray_workers_measure_what_in_process_trials_do(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install bitsmith[ray])")
    import os

    space = ["w8a16", "w4a16"]
    options = dict(calib_samples=8, repeats=1, mix=False, save_model=False)
    serial = tune("digits-cnn", "accuracy_drop<=1", "size", tmp_path / "serial", space, **options)
    parallel = tune("digits-cnn", "accuracy_drop<=1", "size", tmp_path / "ray", space, workers=2, **options)
    rows = [json.loads(line) for line in (tmp_path / "ray" / "trials.jsonl").read_text().splitlines()[1:]]
    assert parallel["workers"] == 2 and serial["workers"] == 1
    assert sorted(row["name"] for row in rows) == sorted(space) and all(row["pid"] != os.getpid() for row in rows)
    for a, b in zip(serial["trials"], parallel["trials"]):  # same codes; one test image may flip on other threads
        assert a["name"] == b["name"] and a["bytes"] == b["bytes"]
        assert a["accuracy_drop_points"] == pytest.approx(b["accuracy_drop_points"], abs=0.25)
    assert parallel["best"] == serial["best"]
