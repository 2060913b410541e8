"""The import graph keeps ``../shared/DESIGN.md``'s one-way flow: layers only import downwards, no cycles.

Run ``python tests/test_layers.py`` to print the graph (module → what it imports, by layer). Imports
inside functions count (they run); imports under ``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"

#: Lowest first. A module imports only from lower layers, plus the same-layer edges in ``ALLOWED``.
LAYERS: list[tuple[str, set[str]]] = [
    (
        "data, and imports deferred to first use",
        {"errors", "records", "lazy", "evaluation", "evaluation.settings", "votes", "sending"},
    ),
    (
        "what the job builds on: objects' local copies, the job file's sections, JSON Schema checks",
        {"storage", "job_sections", "schema_checks"},
    ),
    ("the job, the options, the package", {"spec", "options", "pipeline"}),
    ("parts of pure policy", {"sending.rates", "sending.inflight", "sending.budget"}),
    (
        "pure policy",
        {
            "ids",
            "sending.pacing",
            "sending.retries",
            "sending.breaker",
            "schema_types",
            "grammar",
            "costs",
            "validator",
            "conversations",
            "tools",
            "answer_record",
            "evaluation.metrics",
            "evaluation.tables",
            "evaluation.report",
            "sse",
            "connection_causes",
            "templates",
        },
    ),
    (
        "stages",
        {
            "reader",
            "prompts",
            "client",
            "sending.retries",
            "sending.buckets",
            "sending.pool",
            "ledger",
            "writer",
            "media",
            "sending.shared_limits",
            "progress",
            "batch_output",
            "output_tables",
            "runs_log",
            "job_lock",
            "seen_hashes",
            "evaluation.gold",
        },
    ),
    (
        "one request, one job's checks",
        {"prepare", "sending.attempts", "uptodate", "shard_ledger", "patching", "evaluation.evaluate"},
    ),
    ("what changed since the last output", {"incremental"}),
    ("what a run has to do, where it sends", {"decision", "local_endpoint"}),
    ("executors", {"executors", "executors.local", "executors.ray"}),
    ("composers", {"runner", "planning", "starter", "voting", "reports"}),
    ("the command", {"cli"}),
    ("python -m pipeline", {"__main__"}),
]
#: Same-layer edges, each with its reason. Anything else sideways is a design change: say so here.
ALLOWED: dict[tuple[str, str], str] = {
    ("pipeline", "options"): "the package re-exports RunOptions and StopToken (its public API)",
    ("ledger", "runs_log"): "the runs log shares the ledger's file and connection (one state file per job)",
    ("sending.shared_limits", "sending.buckets"): "a shared bucket holds the same seconds of quota as the local pacer",
    ("executors.ray", "executors.local"): "a Ray shard runs the local Dispatch: one sending code path",
    ("executors", "executors.local"): "the package picks its executors (imported on demand)",
    ("executors", "executors.ray"): "the package picks its executors (imported on demand)",
    ("grammar", "schema_types"): "the grammar rewrite walks schemas with schema_types' $ref resolution",
    ("tools", "schema_types"): "a function's parameters are JSON Schemas, checked and compiled like output.schema",
    ("tools", "validator"): "the job's functions become the validator's rules for judging calls",
    ("voting", "runner"): "each sample and the escalation of a voted job is an ordinary run",
    ("planning", "voting"): "plan prices each sample's requests and the escalation share the stages measured",
    ("validator", "schema_types"): "a request's own functions (a Batch line's tools) are compiled like output.schema",
}
#: The built-in server imitates the API: it may use the constants of the code it imitates (and its own modules).
LOCALAPI_MAY_IMPORT = {"errors", "records", "spec", "prompts", "costs", "schema_types"}


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
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        graph[name] = _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))) - {name}
    return graph


def layer_of(module: str) -> int:
    if module.startswith("localapi"):
        return 3  # a stage of its own (the server), see LOCALAPI_MAY_IMPORT
    for index, (_, members) in enumerate(LAYERS):
        if module in members:
            return index
    raise AssertionError(f"pipeline.{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def test_every_module_has_a_layer() -> None:
    for module in import_graph():
        layer_of(module)


def test_imports_only_go_down() -> None:
    problems = []
    for module, deps in import_graph().items():
        if module.startswith("localapi"):
            problems += [
                f"{module} -> {d}" for d in deps if not d.startswith("localapi") and d not in LOCALAPI_MAY_IMPORT
            ]
            continue
        for dep in deps:
            if dep.startswith("localapi"):
                if layer_of(module) < 6:  # only composers (and the cli's `serve`) start the built-in server
                    problems.append(f"{module} -> {dep}")
                continue
            below = layer_of(dep) < layer_of(module)
            if not below and (module, dep) not in ALLOWED:
                problems.append(f"{module} ({LAYERS[layer_of(module)][0]}) -> {dep} ({LAYERS[layer_of(dep)][0]})")
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_nothing_imports_the_cli_or_the_composers_from_below() -> None:
    for module, deps in import_graph().items():
        if module not in ("__main__",):
            assert "cli" not in deps, f"{module} imports the cli"
        if layer_of(module) < 6 and module != "pipeline":
            assert not deps & {"runner", "planning"}, f"{module} imports a composer"


def test_no_cycles() -> None:
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


def main() -> None:
    graph = import_graph()
    for index, (title, _) in reversed(list(enumerate(LAYERS))):
        print(f"── {index} {title}")
        for module in sorted(m for m in graph if layer_of(m) == index and not m.startswith("localapi.")):
            deps = ", ".join(sorted(graph[module])) or "-"
            print(f"   {module:<18} → {deps}")
    print("── localapi (the built-in server)")
    for module in sorted(m for m in graph if m.startswith("localapi")):
        print(f"   {module:<18} → {', '.join(sorted(graph[module])) or '-'}")


if __name__ == "__main__":
    sys.exit(main())
