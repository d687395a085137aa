"""The folder tree is the architecture: each layer imports only from the layers below it, no module imports
itself back through others (no import cycle, lazy imports included), and the README's ARCHITECTURE section
names exactly the folders there are."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "bitsmith"
README = PACKAGE.parents[1] / "README.md"

# what each part of bitsmith may import (besides itself and errors / _version, which everything may use)
ALLOWED = {
    "formats": set(),
    "algorithms": {"formats"},
    "nn": {"formats", "algorithms"},
    "recipe": set(),
    "zoo": {"nn"},  # the zoo reads the CPU's flags to pin its training to reproducible code paths
    "pipeline": {"formats", "algorithms", "nn", "recipe"},
    "stages": {"formats", "algorithms", "nn", "recipe", "pipeline"},
    "io": {"formats", "algorithms", "nn", "recipe", "pipeline", "zoo"},
    "evaluation": {"zoo"},
    "export": {"formats", "algorithms", "nn", "io"},
    "api": {"formats", "algorithms", "nn", "recipe", "pipeline", "stages", "io", "evaluation", "export", "zoo"},
    "cli": {"api", "recipe", "io", "evaluation", "zoo"},
}
EVERYONE = {"errors", "_version"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every bitsmith module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("bitsmith"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bitsmith"):
            for alias in node.names:  # `from bitsmith.stages import quantize` imports a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _is_module(candidate) else node.module)
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_each_layer_imports_only_from_below():
    wrong = []
    for module, imported in _graph().items():
        part = _part(module)
        if part in ("",) + tuple(EVERYONE):  # bitsmith/__init__.py gathers the public API; errors imports nothing
            continue
        assert part in ALLOWED, f"{module}: a folder the layering does not know; add it to ALLOWED and README"
        for target in imported:
            other = _part(target)
            if other not in ({part} | EVERYONE | ALLOWED[part]):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = _graph()

    def owner(target):  # an import of a name resolves to its module (or package)
        while target not in graph and "." in target:
            target = target.rpartition(".")[0]
        return target

    edges = {m: {owner(t) for t in ts} - {m} for m, ts in graph.items() if m != "bitsmith"}
    for module in edges:  # the package __init__ files of a module are imported first anyway: not an edge back
        edges[module] = {t for t in edges[module] if t != "bitsmith" and not module.startswith(t + ".")}
    state, cycle = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycle.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycle, " -> ".join(cycle[0])


def test_readme_architecture_names_every_folder():
    text = README.read_text()
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^\s*(?:src/bitsmith/)?([a-z_]+)/\s", section, flags=re.M))
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    assert named == folders, (sorted(named - folders), sorted(folders - named))
