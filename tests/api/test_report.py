"""bitsmith report on a real compress directory and a real tune directory of digits-cnn: one self-contained page
(nothing fetched, every plot a PNG that decodes), the trials with the best and the fronts marked, the quantized
layers, bad input refused with one line and nothing written; and the page as headless Chromium draws it."""

import base64
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bitsmith import BitsmithError
from bitsmith.api.compress import compress
from bitsmith.api.inspect import inspect_checkpoint
from bitsmith.api.report import report
from bitsmith.api.tune import tune
from conftest import run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "digits-w8a16"
    compress("digits-cnn", "w8a16", out=out, calib_samples=8, repeats=1)
    return out


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "search"
    summary = tune("digits-cnn", "accuracy_drop<=1", "size", out, ["w8a16", "w4a16"], calib_samples=8, repeats=1)
    return out, summary


@pytest.fixture(scope="module")
def tune_page(tuned, tmp_path_factory):
    out = tmp_path_factory.mktemp("page") / "tune.html"
    return out, report(tuned[0], out)


def images(page: str) -> list[bytes]:
    """The decoded bytes of every <img> (each must be a base64 PNG data URI)."""
    sources = re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)
    assert len(sources) == page.count("<img"), "an <img> without a quoted src"
    found = []
    for source in sources:
        assert source.startswith("data:image/png;base64,"), source[:60]
        data = base64.b64decode(source.removeprefix("data:image/png;base64,"), validate=True)
        assert data.startswith(PNG_SIGNATURE)
        Image.open(io.BytesIO(data)).verify()  # a whole, valid PNG
        found.append(data)
    return found


def assert_self_contained(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"@import|url\(", page)  # no stylesheet or font fetched from CSS
    for attribute, value in re.findall(r"\b(src|href)=\"([^\"]*)\"", page):
        assert value.startswith("data:image/png;base64,") if attribute == "src" else value.startswith("#"), value[:60]
    assert not re.search(r"<(link|iframe|object|embed)\b", page)
    assert not re.search(r"<script\b[^>]*\bsrc=", page)


def table_after(page: str, heading: str) -> str:
    """The HTML of the first <table> of the section titled ``heading``."""
    section = page.split(f"<h2>{heading}", 1)[1].split("<section", 1)[0]
    return section.split("<table>", 1)[1].split("</table>", 1)[0]


def test_a_compress_report_is_self_contained_and_lists_the_quantized_layers(compressed, tmp_path):
    out = tmp_path / "report.html"
    result = report(compressed, out)
    page = out.read_text()
    assert result == {"path": str(out), "bytes": out.stat().st_size,
                      "sections": ["summary", "quality", "layers", "stages", "machine"]}
    assert_self_contained(page)
    assert len(images(page)) == 1  # bits per layer (a compress directory has no front and no sensitivity)
    info = inspect_checkpoint(compressed)
    quantized = [row for row in info["layers"] if row["module"] != "Linear"]
    assert [row["name"] for row in quantized] == ["classifier.2"]  # w8a16 quantizes the one Linear of digits-cnn
    layers = table_after(page, "Per-layer scheme and kernel")
    for row in quantized:
        assert f"<td>{row['name']}</td>" in layers and row["kernel"] in layers
    metrics = info["metrics"]
    quality = table_after(page, "Size, latency and quality")
    assert f"{metrics['bytes'] / 1e6:.3f} MB" in quality and f"{metrics['original_bytes'] / 1e6:.3f} MB" in quality
    assert f"{metrics['accuracy']:.6g}" in quality and f"{metrics['float_accuracy']:.6g}" in quality


def test_a_tune_report_marks_the_best_trial_and_the_fronts(tuned, tune_page):
    directory, summary = tuned
    out, result = tune_page
    page = out.read_text()
    assert_self_contained(page)
    assert summary["met"] and summary["best"]
    assert result["sections"][:3] == ["summary", "trials", "pareto"]
    # the search wrote its sensitivity table and the best model: both are on the page
    assert (directory / "sensitivity.json").exists() and (directory / "model" / "bitsmith.json").exists()
    assert {"sensitivity", "model", "layers"} <= set(result["sections"])
    assert len(images(page)) == 3  # the fronts, the sensitivity bars, the best model's bits per layer
    trials = table_after(page, "Trials")
    rows = re.findall(r"<tr( class=\"best\")?><td>([^<]*)</td><td>([^<]*)</td>", trials)
    assert [name for _, name, _ in rows] == [t["name"] for t in summary["trials"]]
    for best_class, name, marks in rows:
        assert bool(best_class) == (name == summary["best"]) == ("★ best" in marks)
        assert ("size front" in marks) == (name in summary["front_size"])
        assert ("latency front" in marks) == (name in summary["front_latency"])
    assert {"w8a16", "w4a16"} <= {name for _, name, _ in rows}


def test_a_tune_report_shows_the_per_layer_sensitivity(tuned, tune_page):
    table = json.loads((tuned[0] / "sensitivity.json").read_text())
    page = tune_page[0].read_text()
    sensitivity = table_after(page, "Per-layer sensitivity")
    for row in table["rows"]:
        cells = f"<td>{row['group']}</td><td>{row['candidate']}</td><td class=\"num\">{row['measured']:.6g}</td>"
        assert cells in sensitivity
    for proxy in table["spearman"]:
        assert f"<td>{proxy}</td>" in page
    assert html.escape(table["note"]) in page


def test_an_unmet_target_marks_the_closest_trial_and_lists_the_blocking_layers(tuned, tmp_path):
    directory = tmp_path / "search"
    shutil.copytree(tuned[0], directory)  # the same trials, retargeted: tune reuses its log
    summary = tune("digits-cnn", "accuracy_drop<=-1", "size", directory, ["w8a16", "w4a16"], calib_samples=8,
                   repeats=1)
    assert not summary["met"] and summary["blocking"]
    result = report(directory, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "blocking" in result["sections"] and 'class="best"' not in page
    marks = dict(re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td>", table_after(page, "Trials")))
    assert marks[summary["closest"]["name"]].startswith("closest")
    assert not any("best" in text for text in marks.values())
    blocking = table_after(page, "Layers blocking the target")
    assert all(f"<td>{row['layer']}</td>" in blocking for row in summary["blocking"])


def test_optional_parts_are_skipped_and_unknown_keys_kept(tuned, tmp_path):
    """A tune directory without sensitivity.json and model/, with keys the page has no section for (peers'
    figures taken from the real trials, as another search would report them)."""
    directory = tmp_path / "search"
    directory.mkdir()
    shutil.copy(tuned[0] / "trials.jsonl", directory)
    summary = json.loads((tuned[0] / "tune.json").read_text())
    metric = summary["metric"]
    summary["peers"] = [{"name": f"peer-{t['name']}", "latency_ratio": t["latency_ratio"] * 1.1,
                         metric: t[metric] + 0.5} for t in summary["trials"][:2]]
    summary["blocking"] = [{"layer": "classifier.2", "least_harm": 2.0, "allowed_harm": 1.0}]
    summary["search_seconds"] = 12.5
    (directory / "tune.json").write_text(json.dumps(summary))
    result = report(directory, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert result["sections"] == ["summary", "trials", "pareto", "peers", "blocking", "other"]
    assert "peer-" in table_after(page, "Peers") and "classifier.2" in table_after(page, "Layers blocking")
    assert "<td>search_seconds</td><td>12.5</td>" in table_after(page, "Other keys of tune.json")
    assert len(images(page)) == 1


def test_a_compress_directory_with_a_sensitivity_table(compressed, tuned, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(compressed, directory)
    shutil.copy(tuned[0] / "sensitivity.json", directory)
    result = report(directory, tmp_path / "r.html")
    assert result["sections"] == ["summary", "quality", "sensitivity", "layers", "stages", "machine"]
    assert len(images((tmp_path / "r.html").read_text())) == 2


def damaged(source: Path, tmp_path: Path, name: str, text: str) -> Path:
    directory = tmp_path / "damaged"
    shutil.copytree(source, directory)
    (directory / name).write_text(text)
    return directory


@pytest.mark.parametrize("case, fragment", [
    ("missing", "no such directory"),
    ("file", "is not a directory"),
    ("neither", "is neither a compressed model (no bitsmith.json) nor a tune directory (no tune.json)"),
    ("tune.json", "damaged tune summary"),
    ("tune.json trials", "has no list of named 'trials'"),
    ("trials.jsonl", "damaged tune log: line 2 of"),
    ("sensitivity.json", "damaged sensitivity table"),
    ("bitsmith.json", "is not valid JSON"),
    ("out parent", "does not exist; create it first"),
    ("out directory", "is a directory"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(case, fragment, compressed, tuned, tmp_path):
    out, path = tmp_path / "report.html", tuned[0]
    if case == "missing":
        path = tmp_path / "nowhere"
    elif case == "file":
        path = tmp_path / "a-file"
        path.write_text("x")
    elif case == "neither":
        path = tmp_path / "empty"
        path.mkdir()
    elif case == "tune.json":
        path = damaged(tuned[0], tmp_path, "tune.json", '{"trials": [')
    elif case == "tune.json trials":
        path = damaged(tuned[0], tmp_path, "tune.json", '{"metric": "accuracy_drop_points", "trials": 3}')
    elif case == "trials.jsonl":
        lines = (tuned[0] / "trials.jsonl").read_text().splitlines()
        path = damaged(tuned[0], tmp_path, "trials.jsonl", "\n".join([lines[0], lines[1][:-9], *lines[2:]]))
    elif case == "sensitivity.json":
        path = damaged(tuned[0], tmp_path, "sensitivity.json", '{"rows": [{"candidate": "w8a16"}]}')
    elif case == "bitsmith.json":
        path = damaged(compressed, tmp_path, "bitsmith.json", '{"format_version": 1,')
    elif case == "out parent":
        out = tmp_path / "no" / "such" / "report.html"
    elif case == "out directory":
        out = tmp_path / "a-dir"
        out.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(BitsmithError, match=re.escape(fragment)) as caught:
        report(path, out)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no report, no staging file left


def test_the_cli_prints_one_line_or_json(compressed, tmp_path, capsys):
    out = tmp_path / "r.html"
    code, stdout, stderr = run_cli(capsys, "report", compressed, "--out", out)
    assert code == 0, stderr
    kb = out.stat().st_size / 1024
    assert stdout == f"wrote {out} ({kb:.0f} KB): sections summary, quality, layers, stages, machine\n"
    code, stdout, stderr = run_cli(capsys, "report", compressed, "--out", out, "--json")  # replaced in place
    assert code == 0, stderr
    assert json.loads(stdout) == {"path": str(out), "bytes": out.stat().st_size,
                                  "sections": ["summary", "quality", "layers", "stages", "machine"]}


def test_the_cli_refuses_bad_input_with_one_error_line(tmp_path, capsys):
    code, stdout, stderr = run_cli(capsys, "report", tmp_path / "nowhere", "--out", tmp_path / "r.html")
    assert code == 2 and stdout == ""
    assert stderr == f"error: no such directory: {tmp_path / 'nowhere'}\n"
    assert not (tmp_path / "r.html").exists()


# ---------------------------------------------------------------------------------------------- in a browser


def chromium() -> str | None:
    return next(filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))), None)


def shows_plots(screenshot: Image.Image) -> bool:
    """A good part of the page is not white, and it holds several distinct saturated colours (the plots')."""
    pixels = np.asarray(screenshot.convert("RGB")).astype(int)  # (H, W, 3)
    drawn = (pixels < 245).any(axis=-1).mean()
    saturation = pixels.max(axis=-1) - pixels.min(axis=-1)
    coloured = pixels[saturation > 80]  # (N, 3): plot colours, not text or grid greys
    hues = {tuple(c) for c in (coloured // 64).tolist()}  # coarse colour bins
    return drawn > 0.05 and len(coloured) > 0.005 * saturation.size and len(hues) >= 3


def test_a_blank_or_grey_page_does_not_pass_for_plots():
    assert not shows_plots(Image.new("RGB", (1200, 3000), "white"))
    grey = Image.new("RGB", (1200, 3000), "white")
    grey.paste((60, 60, 60), (0, 0, 1200, 1500))  # text-like greys only
    assert not shows_plots(grey)


def dump_body(browser: list[str], page: Path) -> tuple[str, list[str]]:
    """(the <body> tag after the page's load handler ran, the console lines Chromium logged)."""
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return re.search(r"<body[^>]*>", dom.stdout).group(0), [l for l in dom.stderr.splitlines() if "CONSOLE" in l]


@pytest.mark.skipif(chromium() is None, reason="no chromium, chromium-browser or google-chrome on PATH (make test"
                    " installs Debian's chromium where apt-get works)")
def test_headless_chromium_draws_the_page_without_errors(tune_page, tmp_path):
    page, _ = tune_page
    browser = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    count = page.read_text().count("<img")
    body, console = dump_body(browser, page)
    assert f'data-images="{count}/{count}"' in body and 'data-errors=""' in body, body  # the page's own check
    assert not console, console
    # the check itself: a page with one image damaged and a script error is caught
    broken = tmp_path / "broken.html"
    text = page.read_text().replace("base64,", "base64,AAAA", 1)
    broken.write_text(text.replace("</body>", "<script>nothing();</script></body>"))
    body, console = dump_body(browser, broken)
    assert f'data-images="{count - 1}/{count}"' in body and "image did not load" in body, body
    assert any("nothing is not defined" in line for line in console), console
    shot = tmp_path / "page.png"
    drawn = subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri()],
                           capture_output=True, text=True, timeout=120)
    assert drawn.returncode == 0 and shot.exists(), drawn.stderr[-2000:]
    assert shows_plots(Image.open(shot))
