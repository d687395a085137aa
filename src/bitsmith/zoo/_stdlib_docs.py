"""Collect docs-lm's documents: ``python -I -S _stdlib_docs.py OUT.json`` writes ``[[name, text], ...]``.

Run by ``docs_lm.documents()`` in a child that sees the standard library only (``-S``: no site-packages, ``-I``:
no environment variables, user site or working directory on the path), so nothing another library adds to a
stdlib module reaches the corpus. Imports nothing outside the standard library.

Documents: the ``pydoc_data.topics`` pages (``topic:<key>``), then, per importable public stdlib module and
submodule in sorted order, its docstrings (``module:<name>``): the module's, then its public classes (with
their public methods and properties) and functions, by name, each defined in that module. A docstring seen
earlier (an inherited or shared one) is dropped, so no text is in two documents.
"""

import importlib
import inspect
import json
import pkgutil
import sys
import warnings

MIN_DOCSTRING_CHARS = 40  # shorter docstrings are mostly "Return self==value." boilerplate

# Modules whose import opens windows, prints, starts a GUI or is slow, and packages of tests or generated codecs.
SKIPPED_MODULES = frozenset({
    "antigravity",  # opens a web browser
    "this",  # prints the Zen of Python
    "idlelib", "tkinter", "turtle", "turtledemo",  # GUI
    "test", "lib2to3",  # the test suite; lib2to3 may write grammar pickles next to itself
    "readline", "rlcompleter",  # may write terminal escape codes
    "encodings",  # ~120 generated codec modules with one-line docstrings
    "ensurepip", "venv", "distutils",  # packaging machinery
    "pydoc_data",  # the topics are taken directly
})


def stdlib_module_names() -> list[str]:
    """Public stdlib modules and their public submodules, sorted; importing them on the way."""
    names = []
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in SKIPPED_MODULES:
            continue
        try:
            module = importlib.import_module(top)
        except Exception:  # not built on this platform (winreg, msvcrt, ...)
            continue
        names.append(top)
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), top + ".", onerror=lambda name: None):
            parts = info.name.split(".")
            if any(part.startswith("_") or part in ("test", "tests") for part in parts):
                continue
            try:
                importlib.import_module(info.name)
            except Exception:  # dbm.gnu, asyncio.windows_events, ...
                continue
            names.append(info.name)
    return sorted(set(names))


def _defined_in(obj, module_name: str) -> bool:
    """True unless ``obj`` says it comes from another module (C methods say nothing and count as here)."""
    origin = obj.fget if isinstance(obj, property) else obj
    return getattr(origin, "__module__", None) in (None, module_name)


def module_docstrings(module) -> list[str]:
    """The module's docstring, then its public classes (with their methods) and functions, by name."""
    found = [inspect.getdoc(module)]
    for name, obj in sorted(vars(module).items()):
        # defined here, not imported: re-exports are collected where they are defined
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            found.append(inspect.getdoc(obj))
            for attr_name, attr in sorted(vars(obj).items()):
                is_member = inspect.isroutine(attr) or isinstance(attr, property)
                if is_member and not attr_name.startswith("_") and _defined_in(attr, module.__name__):
                    found.append(inspect.getdoc(attr))
        elif inspect.isroutine(obj):
            found.append(inspect.getdoc(obj))
    return [doc for doc in found if doc and len(doc) >= MIN_DOCSTRING_CHARS]


def documents() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    docs = [(f"topic:{key}", topics[key].strip()) for key in sorted(topics)]
    seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules (and typing.io's docstring) warn when touched
        for name in stdlib_module_names():
            fresh = [doc for doc in module_docstrings(sys.modules[name]) if doc not in seen]
            seen.update(fresh)
            if fresh:
                docs.append((f"module:{name}", "\n\n".join(fresh)))
    return docs


if __name__ == "__main__":
    result = documents()  # before opening the output: a module that prints on import cannot reach it
    with open(sys.argv[1], "w", encoding="utf-8") as out:
        json.dump(result, out)
