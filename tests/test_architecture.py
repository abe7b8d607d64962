"""The import graph: serve/ never imports train/, and no module imports itself back through others.
And the map a newcomer reads (docs/architecture.md) names every module.

Read from the source with ``ast`` (imports at any depth, including those inside functions), so
the rules hold for code paths the other tests do not run.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"resserve.serve": ROOT / "serve", "resserve.train": ROOT / "train"}


def modules() -> dict[str, Path]:
    found = {}
    for package, directory in PACKAGES.items():
        for path in directory.rglob("*.py"):
            if "stubs" in path.parts:
                continue
            parts = path.relative_to(directory).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (``from a import b`` counts a.b when it is a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in known}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def test_no_module_of_serve_imports_train():
    offenders = {name: sorted(i for i in deps if i.startswith("resserve.train"))
                 for name, deps in graph().items() if name.startswith("resserve.serve")}
    assert {name: deps for name, deps in offenders.items() if deps} == {}


def test_there_are_no_import_cycles():
    edges = graph()
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(edges[node]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_graph_is_read_at_all():
    """Guards the two tests above against passing on an empty graph."""
    edges = graph()
    assert "resserve.train.export" in edges and "resserve.serve.manifest" in edges["resserve.train.export"]


def documented_files() -> set[str]:
    """The files docs/architecture.md names in backquotes (``{a,b}.py`` spelled out), and those a
    folder's row (``| `serve/backends/` | ...``) names by file name."""
    text, named = (ROOT / "docs" / "architecture.md").read_text(), set()
    for quoted in re.findall(r"`((?:serve|train)/[^`]*\.py)`", text):
        choices = re.fullmatch(r"(.*)\{(.*)\}(.*)", quoted)
        if choices:
            named.update(f"{choices[1]}{name}{choices[3]}" for name in choices[2].split(","))
        else:
            named.add(quoted)
    for folder, row in re.findall(r"^\| `((?:serve|train)/[^`]*/)` \|(.*)$", text, flags=re.MULTILINE):
        named.update(folder + name for name in re.findall(r"[\w.]+\.py", row))
    return named


def test_the_architecture_map_names_every_module():
    files = {str(path.relative_to(ROOT)) for path in modules().values()
             if path.name not in ("__init__.py", "__main__.py")}
    assert sorted(files - documented_files()) == []


def test_the_readme_layout_names_every_module_of_the_packages_top_level():
    """The README's Layout block lists each package's own files; a new one belongs in it too."""
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    top_level = {path.name for path in modules().values()
                 if path.parent in PACKAGES.values() and path.name not in ("__init__.py", "__main__.py")}
    assert len(top_level) > 50 and sorted(name for name in top_level if name not in layout) == []
