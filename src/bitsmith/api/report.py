"""``bitsmith report``: one self-contained HTML page of a compressed model directory or of a tune directory.

    PATH holds                         | the page shows
    bitsmith.json  (bitsmith compress) | size, latency and quality against the float model; per layer: scheme, bits,
                                       | bytes, kernel (table and plot); stages, notes, the machine measured on
    tune.json      (bitsmith tune)     | every trial (best and front members marked, failed ones with why), the
                                       | quality vs size and vs latency fronts with the target; trials.jsonl's
                                       | figures per trial; model/ (the best trial's model) as a compress directory
    sensitivity.json (either)          | measured harm per layer and candidate (table and plot), each proxy's
                                       | Spearman against it and the chosen one

A section whose data is absent is left out; keys of tune.json the page has no section for are shown as a key /
value table, so nothing is lost. The page fetches nothing: inline CSS, plots as PNG data URIs
(``report_plots``), and one inline script that records script errors and images that failed to decode on
``<body>`` (``data-errors``, ``data-images``), for a headless browser to read back. The file is staged beside
``out`` and renamed into place, so an error writes nothing and a reader never sees half a page.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from bitsmith.api.inspect import inspect_checkpoint
from bitsmith.api.report_plots import bits_png, pareto_png, sensitivity_png
from bitsmith.errors import BitsmithError
from bitsmith.io.outputs import publish, staging_file

__all__ = ["report", "read_run", "Section"]

SENSITIVITY_FILE = "sensitivity.json"
TUNE_FILE = "tune.json"
TRIAL_LOG = "trials.jsonl"
MODEL_DIR = "model"  # in a tune directory: the best trial's compressed model
# tune.json keys shown by a section of their own (or not worth showing: file paths); the rest go to "other"
TUNE_KEYS = {"model", "target", "objective", "metric", "trials", "front_size", "front_latency", "met", "best",
             "closest", "failed", "peers", "blocking", "log", "recipe_file", "original_bytes"}
# keys of a trial in tune.json with a column of their own; any other gets a column after them
TRIAL_KEYS = {"name", "bytes", "latency_ratio"}


@dataclass(frozen=True)
class Section:
    key: str  # the short name the CLI lists
    title: str
    body: str  # HTML


# ---------------------------------------------------------------------------------------------- reading


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BitsmithError(f"damaged {what}: {path} is not valid JSON; write it again") from None
    except OSError as err:
        raise BitsmithError(f"cannot read {path}: {err.strerror}") from None


def _read_tune(path: Path) -> dict:
    summary = _read_json(path, "tune summary")
    if not isinstance(summary, dict):
        raise BitsmithError(f"damaged tune summary: {path} is not a JSON object")
    trials = summary.get("trials")
    if not isinstance(trials, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in trials):
        raise BitsmithError(f"damaged tune summary: {path} has no list of named 'trials'")
    if not isinstance(summary.get("metric"), str):
        raise BitsmithError(f"damaged tune summary: {path} names no 'metric'")
    return summary


def _read_trial_log(path: Path) -> dict[str, dict]:
    """{trial name: its row} from trials.jsonl (its first line is the header); {} when there is no log."""
    if not path.is_file():
        return {}
    rows = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raise BitsmithError(f"damaged tune log: line {number} of {path} is not valid JSON") from None
        if number > 1 and isinstance(row, dict) and isinstance(row.get("name"), str):
            rows[row["name"]] = row
    return rows


def _read_sensitivity(path: Path) -> dict | None:
    if not path.is_file():
        return None
    data = _read_json(path, "sensitivity table")
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"group", "candidate"} <= r.keys() for r in rows):
        raise BitsmithError(f"damaged sensitivity table: {path} has no list of 'rows' with group and candidate")
    return data


def read_run(path: str | Path) -> dict:
    """What a compress or tune directory holds: {"kind": "compress" or "tune", "checkpoint": inspect's dict (of
    ``model/`` in a tune directory) or None, "tune", "log", "sensitivity"}."""
    path = Path(path)
    if not path.exists():
        raise BitsmithError(f"no such directory: {path}")
    if not path.is_dir():
        raise BitsmithError(f"{path} is not a directory; give a bitsmith compress or bitsmith tune --out directory")
    run = {"path": str(path), "tune": None, "log": {}, "checkpoint": None}
    if (path / "bitsmith.json").exists():
        run.update(kind="compress", checkpoint=inspect_checkpoint(path))
    elif (path / TUNE_FILE).exists():
        model = path / MODEL_DIR
        run.update(kind="tune", tune=_read_tune(path / TUNE_FILE), log=_read_trial_log(path / TRIAL_LOG),
                   checkpoint=inspect_checkpoint(model) if (model / "bitsmith.json").exists() else None)
    else:
        raise BitsmithError(f"{path} is neither a compressed model (no bitsmith.json) nor a tune directory"
                            f" (no {TUNE_FILE})")
    run["sensitivity"] = _read_sensitivity(path / SENSITIVITY_FILE)
    return run


# ---------------------------------------------------------------------------------------------- HTML pieces


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(key: str, value) -> str:
    """A value as the page shows it: bytes in MB, seconds in ms, other numbers to 6 significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if _number(value):
        if not math.isfinite(value):
            return str(value)
        if key.endswith("bytes"):
            return f"{value / 1e6:.3f} MB"
        if key.endswith("_s"):
            return f"{value * 1e3:.2f} ms"
        return f"{value:,}" if isinstance(value, int) else f"{value:.6g}"
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        return ", ".join(_fmt("", v) for v in value)
    if isinstance(value, dict) and value and all(not isinstance(v, (dict, list)) for v in value.values()):
        return ", ".join(f"{k}: {_fmt(str(k), v)}" for k, v in value.items())
    return json.dumps(value, indent=1, default=str)


def _cell(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>" if "\n" in text else html.escape(text)  # nested JSON keeps its lines


def _table(columns: list[str], rows: list[list[str]], right: set[str] = frozenset(),
           classes: list[str] | None = None) -> str:
    """An HTML table of plain-text cells (escaped here); ``right`` names the numeric columns."""
    aligned = [' class="num"' if c in right else "" for c in columns]
    head = "".join(f"<th{a}>{html.escape(c)}</th>" for c, a in zip(columns, aligned))
    body = []
    for index, row in enumerate(rows):
        css = f' class="{classes[index]}"' if classes and classes[index] else ""
        cells = "".join(f"<td{a}>{_cell(str(cell))}</td>" for cell, a in zip(row, aligned))
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _value_html(value) -> str:
    """Any JSON value: a mapping as a key / value table, a list of mappings as a table, else text."""
    if isinstance(value, dict) and value:
        return _table(["key", "value"], [[str(k), _fmt(str(k), v)] for k, v in value.items()])
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        columns = list(dict.fromkeys(str(k) for v in value for k in v))
        return _table(columns, [[_fmt(c, v.get(c, "")) for c in columns] for v in value])
    text = _fmt("", value)
    return f"<pre>{html.escape(text)}</pre>" if "\n" in text else f"<p>{html.escape(text)}</p>"


def _img(uri: str, alt: str) -> str:
    return f'<figure><img src="{uri}" alt="{html.escape(alt)}"></figure>'


def _para(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


# ---------------------------------------------------------------------------------------------- compress sections


def _metrics_section(metrics: dict) -> Section | None:
    """Float against compressed: every metric (the machine has a section of its own), paired with its ``float_`` /
    ``original_`` counterpart where there is one."""
    scalars = {k: v for k, v in metrics.items() if k != "machine"}
    if not scalars:
        return None
    counterpart = {k: metrics.get(f"float_{k}", metrics.get(f"original_{k}")) for k in scalars}
    paired = {f"{prefix}{k}" for k in scalars for prefix in ("float_", "original_")}
    rows = [[k, _fmt(k, counterpart[k]) if counterpart[k] is not None else "", _fmt(k, v)]
            for k, v in scalars.items() if k not in paired]
    headline = [r for r in rows if counterpart[r[0]] is not None]
    rows = headline + [r for r in rows if counterpart[r[0]] is None]  # compared figures first
    return Section("quality", "Size, latency and quality against the float model",
                   _table(["metric", "float (original)", "compressed"], rows, right={"float (original)", "compressed"}))


def _layers_section(checkpoint: dict) -> Section | None:
    layers = checkpoint.get("layers", [])
    if not layers:
        return None
    quantized = checkpoint.get("quantized", {})
    rows = []
    for row in layers:
        ran = row.get("ran_at_compress") or {}
        sparsity = f"{row['sparsity']:.0%} {row.get('pattern', '')}" if row.get("sparse_kernel") else ""
        rows.append([row["name"], row["module"], quantized.get(row["name"], row["scheme"]), row["bits"],
                     f"{row['bytes']:,}", row["kernel"], f"{ran['kernel']} ({ran['rows']} rows)" if ran else "",
                     sparsity, row.get("note", "")])
    columns = ["layer", "module", "scheme", "bits", "bytes", "kernel here", "ran at compress", "sparsity", "note"]
    reasons = dict.fromkeys(f"{row['module']}: {row['why']}" for row in layers if row.get("why"))
    totals = ", ".join(f"{label} {_fmt('bytes', checkpoint.get(key))}" for label, key in (
        ("quantized layers", "quantized_bytes"), ("float tensors", "float_bytes"), ("files", "file_bytes")))
    body = (_img(bits_png(layers), "bits per layer, coloured by scheme")
            + _table(columns, rows, right={"bits", "bytes"})
            + "".join(_para(f"why ({reason})") for reason in reasons) + _para(totals))
    return Section("layers", f"Per-layer scheme and kernel ({len(layers)} layers)", body)


def _stages_section(checkpoint: dict) -> Section | None:
    stages, notes, skipped = checkpoint.get("stages", []), checkpoint.get("notes", {}), checkpoint.get("skipped", {})
    if not (stages or notes or skipped):
        return None
    body = ""
    if stages:
        rows = [[s.get("stage", ""), sum("done" in e for e in s.get("layers", {}).values()),
                 ", ".join(f"{k} {_fmt(k, v)}" for k, v in s.get("summary", {}).items()
                           if not isinstance(v, (dict, list)))] for s in stages]
        body += _table(["stage (in order)", "layers changed", "summary"], rows, right={"layers changed"})
    body += "".join(_para(f"note: {name}: {text}") for name, text in notes.items())
    body += "".join(_para(f"kept in float: {name}: {why}") for name, why in skipped.items())
    return Section("stages", "Stages, notes and layers kept in float", body)


def _machine_section(checkpoint: dict) -> Section | None:
    measured = checkpoint.get("metrics", {}).get("machine")
    here = checkpoint.get("machine")
    if not (measured or here):
        return None
    body = ""
    if isinstance(measured, dict):
        body += "<h3>measured on</h3>" + _value_html(measured)
    if isinstance(here, dict):
        body += "<h3>this machine (its kernels are the ones listed as “kernel here”)</h3>" + _value_html(here)
    return Section("machine", "Machine", body)


def _checkpoint_sections(checkpoint: dict | None) -> list[Section | None]:
    if checkpoint is None:
        return []
    return [_metrics_section(checkpoint.get("metrics", {})), _layers_section(checkpoint), _stages_section(checkpoint),
            _machine_section(checkpoint)]


def _compress_summary(checkpoint: dict) -> Section:
    source = checkpoint.get("source", {})
    m = checkpoint.get("metrics", {})
    parts = [f"model {source.get('name') or source.get('class') or source.get('path') or '?'}",
             f"recipe {checkpoint.get('recipe') or '?'}"]
    if _number(m.get("bytes")) and _number(m.get("original_bytes")):
        parts.append(f"size {_fmt('bytes', m['original_bytes'])} -> {_fmt('bytes', m['bytes'])}")
    if _number(m.get("latency_ratio")):
        parts.append(f"latency {m['latency_ratio']:g}x of float")
    if m.get("evaluation"):
        parts.append(f"evaluation: {m['evaluation']}")
    return Section("summary", "Summary", _para("; ".join(parts)))


# ---------------------------------------------------------------------------------------------- tune sections


def _tune_summary(summary: dict) -> Section:
    metric = summary["metric"]
    parts = [f"model {summary.get('model', '?')}", f"target {summary.get('target', '?')}",
             f"objective {summary.get('objective', '?')}", f"{len(summary['trials'])} trials"]
    if summary.get("best"):
        parts.append(f"best: {summary['best']}")
    else:
        closest = summary.get("closest") or {}
        parts.append(f"no trial met the target; closest: {closest.get('name', '?')}"
                     f" ({metric} {_fmt(metric, closest.get(metric))})")
    return Section("summary", "Summary", _para("; ".join(parts)))


def _trial_marks(name: str, summary: dict) -> list[str]:
    marks = ["★ best"] if name == summary.get("best") else []
    if not summary.get("best") and name == (summary.get("closest") or {}).get("name"):
        marks.append("closest")
    marks += [f"{label} front" for label, key in (("size", "front_size"), ("latency", "front_latency"))
              if name in (summary.get(key) or [])]
    return marks


def _trials_section(summary: dict, log: dict[str, dict]) -> Section:
    """Every trial of tune.json with trials.jsonl's figures beside it; a trial's other keys (phase, layer counts
    of a mix, ...) get columns after them."""
    metric = summary["metric"]
    figures = ["size", "size vs float", "latency vs float", "latency", "float latency"]
    extra = [k for k in dict.fromkeys(k for t in summary["trials"] for k in t) if k not in TRIAL_KEYS | {metric}]
    columns = ["trial", "marks", metric, *figures, *extra]
    rows, classes = [], []
    for trial in summary["trials"]:
        logged = (log.get(trial["name"]) or {}).get("metrics") or {}
        rows.append([trial["name"], ", ".join(_trial_marks(trial["name"], summary)), _fmt(metric, trial.get(metric)),
                     _fmt("bytes", trial.get("bytes")), _fmt("", logged.get("size_ratio")),
                     _fmt("", trial.get("latency_ratio")), _fmt("latency_s", logged.get("latency_s")),
                     _fmt("latency_s", logged.get("original_latency_s")), *(_fmt(k, trial.get(k)) for k in extra)])
        classes.append("best" if trial["name"] == summary.get("best") else "")
    body = _table(columns, rows, right={metric, *figures}, classes=classes)
    failed = summary.get("failed") or {}
    if isinstance(failed, dict) and failed:
        body += "<h3>failed trials</h3>" + _table(["trial", "why"], [[n, str(why)] for n, why in failed.items()])
    body += _para("marks: ★ best = the best trial meeting the target by the objective; size / latency front = on the"
                  " Pareto front of quality against size / latency (no other trial is better on both).")
    return Section("trials", "Trials: size, latency and quality", body)


def _target(summary: dict) -> tuple[str, float] | None:
    """(">=" or "<=", value) of the target ("cosine>=0.999"), or None if it does not read so. tune compares the
    value with the summary's metric as it is, so it is in the metric's units."""
    match = re.search(r"(>=|<=)\s*(-?[0-9]*\.?[0-9]+)", str(summary.get("target", "")))
    return (match.group(1), float(match.group(2))) if match else None


def _pareto_section(summary: dict) -> Section | None:
    if not summary["trials"]:
        return None
    peers = summary.get("peers")
    peers = [p for p in peers if isinstance(p, dict)] if isinstance(peers, list) else []
    fronts = {"size": summary.get("front_size") or [], "latency": summary.get("front_latency") or []}
    uri = pareto_png(summary["trials"], summary["metric"], fronts, summary.get("best"), peers, _target(summary))
    legend = ("grey: every trial; blue, joined: the Pareto front; red star: the best trial; dashed green: the target"
              + ("; orange X: peers" if peers else ""))
    return Section("pareto", "Pareto fronts: quality vs size and vs latency",
                   _img(uri, "Pareto fronts") + _para(legend))


def _records_section(key: str, title: str, value) -> Section | None:
    if value in (None, [], {}, ""):
        return None
    return Section(key, title, _value_html(value))


def _other_section(summary: dict, shown: set[str]) -> Section | None:
    other = {k: v for k, v in summary.items() if k not in TUNE_KEYS | shown}
    return _records_section("other", "Other keys of tune.json", other) if other else None


def _model_section(run: dict) -> Section | None:
    if run["checkpoint"] is None:
        return None
    directory, alone = Path(run["path"]) / MODEL_DIR, run["tune"].get("model_dir")
    if not run["tune"].get("best"):  # left there by an earlier search of the same directory
        return Section("model", f"The model in {directory}", _para(
            "No trial met this search's target, so this model is not its choice (an earlier search left it)."
            " The sections below describe it."))
    text = "The sections below describe the compressed model the search kept."
    if isinstance(alone, dict) and _number(alone.get("bytes")) and _number(alone.get("latency_ratio")):
        text += f" Measured alone: {_fmt('bytes', alone['bytes'])}, latency {alone['latency_ratio']:g}x of float."
    return Section("model", f"The best trial's model ({directory})", _para(text))


def _tune_sections(run: dict) -> list[Section | None]:
    summary = run["tune"]
    model = _model_section(run)
    # shown elsewhere: the best model's figures above it, the proxies' summary in the sensitivity section
    shown = {"model_dir"} if model else set()
    shown |= {"sensitivity"} if run["sensitivity"] else set()
    return [_tune_summary(summary), _trials_section(summary, run["log"]), _pareto_section(summary),
            _records_section("peers", "Peers", summary.get("peers")),
            _records_section("blocking", "Layers blocking the target", summary.get("blocking")),
            _other_section(summary, shown), model, *_checkpoint_sections(run["checkpoint"])]


# ---------------------------------------------------------------------------------------------- sensitivity


def _sensitivity_section(data: dict | None) -> Section | None:
    if not data or not data["rows"]:
        return None
    metric = str(data.get("metric", "measured harm"))
    columns = ["layer", "candidate", "measured", "sqnr_db", "output_error", "fisher", "bytes", "float bytes",
               "time vs float", "kernel"]
    rows = []
    for r in data["rows"]:
        ratio = ""
        if _number(r.get("latency_s")) and _number(r.get("float_latency_s")) and r["float_latency_s"] > 0:
            ratio = f"{r['latency_s'] / r['float_latency_s']:.3f}x" + ("" if r.get("saves_time") else " (no saving)")
        rows.append([r["group"], r["candidate"], _fmt("", r.get("measured")), _fmt("", r.get("sqnr_db")),
                     _fmt("", r.get("output_error")), _fmt("", r.get("fisher")), _fmt("", r.get("bytes")),
                     _fmt("", r.get("float_bytes")), ratio, r.get("kernel", "")])
    spearman = data.get("spearman") or {}
    body = (_img(sensitivity_png(data["rows"], metric), "measured harm per layer and candidate")
            + _para(f"measured: {metric} with only that layer changed (larger is worse); bytes: the layer's storage.")
            + _table(columns, rows, right=set(columns[2:9])))
    if isinstance(spearman, dict) and spearman:
        body += "<h3>how well each proxy ranks the measured harm (Spearman)</h3>" + _table(
            ["proxy", "Spearman"], [[p, _fmt("", v)] for p, v in spearman.items()], right={"Spearman"})
    per_candidate = data.get("spearman_per_candidate")
    if isinstance(per_candidate, dict) and per_candidate:
        body += "<h3>per candidate</h3>" + _value_html(per_candidate)
    body += _para(f"chosen: {data.get('chosen', 'n/a')}. {data.get('note', '')}".strip())
    return Section("sensitivity", "Per-layer sensitivity", body)


# ---------------------------------------------------------------------------------------------- the page

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #1d2329; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #d0d7de; padding-bottom: 0.2em; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
nav a { margin-right: 1em; } .sub { color: #57606a; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f3f6; } tbody tr:nth-child(even) { background: #f8f9fa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best { background: #fff4d6 !important; font-weight: 600; }
figure { margin: 0.5em 0; } img { max-width: 100%; height: auto; border: 1px solid #e1e4e8; }
pre { background: #f6f8fa; padding: 0.5em; overflow-x: auto; font-size: 0.85em; }
"""

# records script errors and images that did not decode on <body>, for a headless browser's --dump-dom
_SELF_CHECK = """
(function () {
  var errors = [];
  window.addEventListener("error", function (event) {
    var target = event.target;
    errors.push(target && target.tagName === "IMG" ? "image did not load: " + target.alt : String(event.message));
  }, true);
  window.addEventListener("load", function () {
    var images = Array.prototype.slice.call(document.images);
    var shown = images.filter(function (image) { return image.complete && image.naturalWidth > 0; });
    document.body.setAttribute("data-images", shown.length + "/" + images.length);
    document.body.setAttribute("data-errors", errors.join("; "));
  });
})();
"""


def _page(title: str, subtitle: str, sections: list[Section]) -> str:
    nav = " ".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    parts = "\n".join(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>\n{s.body}</section>' for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{_CSS}</style>\n<script>{_SELF_CHECK}</script>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
            f'<p class="sub">{html.escape(subtitle)}</p>\n<nav>{nav}</nav>\n{parts}\n</body></html>\n')


def _check_out(out: str | Path) -> Path:
    """``out`` must be a file name in an existing directory (an existing file is replaced, atomically)."""
    out = Path(out)
    if out.name in ("", ".", "..") or out.is_dir():
        raise BitsmithError(f"--out {out} is a directory; give the name of the HTML file to write")
    if out.is_symlink():
        raise BitsmithError(f"--out {out} is a symbolic link; give a real path")
    if not out.absolute().parent.is_dir():
        raise BitsmithError(f"--out {out}: the directory {out.absolute().parent} does not exist; create it first")
    return out


def _write_atomically(out: Path, data: bytes) -> None:
    """Staged beside ``out``, then renamed into place: a reader sees the old file or the whole new one."""
    try:
        tmp = staging_file(out)
    except OSError as err:
        raise BitsmithError(f"cannot write {out}: {err.strerror}") from None
    try:
        tmp.write_bytes(data)
        publish(tmp, out)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise BitsmithError(f"cannot write {out}: {err.strerror}") from None
        raise


def report(path: str | Path, out: str | Path) -> dict:
    """Write the HTML report of the compress or tune directory ``path`` to ``out``; returns {"path", "bytes",
    "sections"} (the short names of the sections included, in page order)."""
    out = _check_out(out)
    run = read_run(path)
    if run["kind"] == "tune":
        sections = _tune_sections(run)
        sections.insert(3, _sensitivity_section(run["sensitivity"]))  # after the summary, trials and fronts
        title = f"bitsmith tune report: {run['tune'].get('model', '?')}"
    else:
        sections = [_compress_summary(run["checkpoint"]), *_checkpoint_sections(run["checkpoint"])]
        sections.insert(2, _sensitivity_section(run["sensitivity"]))  # after the summary and the quality table
        title = f"bitsmith compress report: {run['checkpoint'].get('recipe') or '?'}"
    sections = [s for s in sections if s is not None]
    page = _page(title, f"made by bitsmith report from {run['path']}", sections).encode("utf-8")
    _write_atomically(out, page)
    return {"path": str(out), "bytes": len(page), "sections": [s.key for s in sections]}
