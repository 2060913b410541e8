"""The import graph keeps ``../shared/DESIGN.md``'s one-way flow: stages only import stages below them.

A unit is a stage package (``pipeline/sending/``) or a top-level module (``pipeline/runner.py``). A unit
imports only units of lower layers: there is no list of allowed exceptions. Inside a package, modules
import each other freely but without cycles. Imports inside functions count (they run); imports under
``if TYPE_CHECKING:`` do not (they never run).

Run ``python tests/test_layers.py`` to print the graph (unit → the units it imports, by layer).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"

#: Lowest first. A unit imports only from units of lower layers.
LAYERS: list[tuple[str, set[str]]] = [
    ("data every stage shares, imports deferred to first use", {"errors", "records", "lazy"}),
    ("how a caller runs a job", {"options"}),
    ("the package's public face (its version, its names)", {"pipeline"}),
    ("the job", {"job"}),
    ("answers: their record, validation, costs", {"answers"}),
    ("tables in and out, objects", {"tables"}),
    ("requests built from rows, checked before paying", {"requests"}),
    ("sending: client, pool, buckets, retries, pacing, attempts", {"sending"}),
    ("state kept between runs: ledger, lock, what changed, the run's one decision", {"state"}),
    ("the built-in API server", {"localapi"}),
    ("executors", {"executors"}),
    ("a run, a starter job", {"runner", "starter"}),
    ("quality: votes and escalation in stages, evaluation against right answers", {"quality"}),
    ("the plan of a job (its stages too)", {"planning"}),
    ("the command line", {"cli"}),
    ("python -m pipeline", {"__main__"}),
]


def unit_of(module: str) -> str:
    """``sending.pool`` → ``sending``; a top-level module is its own unit."""
    head = module.split(".", maxsplit=1)[0]
    return head if (PACKAGE / head).is_dir() else module


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "pipeline"


def _runtime_imports(tree: ast.AST) -> set[str]:
    """``pipeline.*`` modules imported when the code runs (TYPE_CHECKING blocks excluded)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            base = node.module.removeprefix("pipeline").lstrip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                is_module = (PACKAGE / (sub.replace(".", "/") + ".py")).exists() or (PACKAGE / sub).is_dir()
                found.add(sub if is_module else (base or "pipeline"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pipeline":
                    found.add(alias.name.removeprefix("pipeline").lstrip(".") or "pipeline")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the modules it imports at run time."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        graph[name] = _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))) - {name}
    return graph


def unit_graph() -> dict[str, set[str]]:
    """Unit → the other units it imports."""
    units: dict[str, set[str]] = {}
    for module, deps in import_graph().items():
        unit = "pipeline" if module == "pipeline" else unit_of(module)
        units.setdefault(unit, set()).update(unit_of(d) if d != "pipeline" else "pipeline" for d in deps)
    return {unit: deps - {unit} for unit, deps in units.items()}


def layer_of(unit: str) -> int:
    for index, (_, members) in enumerate(LAYERS):
        if unit in members:
            return index
    raise AssertionError(f"pipeline.{unit} is in no layer: add it to LAYERS in tests/test_layers.py")


def test_every_unit_has_a_layer() -> None:
    for unit in unit_graph():
        layer_of(unit)


def test_units_import_only_lower_layers() -> None:
    problems = [
        f"{unit} ({LAYERS[layer_of(unit)][0]}) -> {dep} ({LAYERS[layer_of(dep)][0]})"
        for unit, deps in unit_graph().items()
        for dep in sorted(deps)
        if layer_of(dep) >= layer_of(unit)
    ]
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_no_module_cycles() -> None:
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_tree_shows_the_stages() -> None:
    """Only the package's face, its shared data and the composers sit at the top; stages are folders."""
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert top <= set().union(*(members for _, members in LAYERS)), top
    assert len(top) <= 10, f"{len(top)} modules at the top of pipeline/: put stage modules in their folder"


def main() -> None:
    graph = unit_graph()
    for index, (title, members) in reversed(list(enumerate(LAYERS))):
        print(f"── {index} {title}")
        for unit in sorted(members & set(graph)):
            print(f"   {unit:<10} → {', '.join(sorted(graph[unit])) or '-'}")


if __name__ == "__main__":
    sys.exit(main())
