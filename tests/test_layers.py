"""The package's layers, read from its source: imports point down only, and no module imports itself back.

    cli                      nothing in dsum imports it
    pipeline                 ties the layers below into `dsum train`
    cluster (Ray)  ·  tracking (MLflow)  ·  deploy
    core: errors, config, rundir, data, model, train, plan, eval/   (neither Ray nor MLflow)

and inside the core, levels (CORE_LEVELS): the base (errors, config, rundir, ...) below scoring, below
data, below model, below training and evaluation, which sit beside each other (neither imports the other),
below plan. Every import counts, those inside functions too: a lazy import is still a dependency.
"""

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "dsum"
# What each layer may import from dsum (its own modules always), and which third-party roots it must not.
UPPER = ("dsum.cluster", "dsum.tracking", "dsum.deploy", "dsum.pipeline", "dsum.cli")
RULES = {
    "core": {"forbidden": UPPER, "third_party": ("ray", "mlflow")},
    "dsum.tracking": {
        "forbidden": ("dsum.cluster", "dsum.deploy", "dsum.pipeline", "dsum.cli"),
        "third_party": ("ray",),
    },
    "dsum.cluster": {"forbidden": ("dsum.deploy", "dsum.pipeline", "dsum.cli"), "third_party": ()},
    "dsum.deploy": {"forbidden": ("dsum.cluster", "dsum.tracking", "dsum.pipeline", "dsum.cli"), "third_party": ()},
    "dsum.pipeline": {"forbidden": ("dsum.cli",), "third_party": ()},
    "dsum.cli": {"forbidden": (), "third_party": ()},
}


# The core's inner order, lowest first: a module imports from its own level or below; in a level marked
# beside, its modules never import each other.
CORE_LEVELS = [
    ("base", False, {"dsum", "dsum.errors", "dsum.batches", "dsum.steps", "dsum.config", "dsum.rundir", "dsum.sweep", "dsum.memory",
                     "dsum.sample", "dsum.sample.documents", "dsum.sample.generate", "dsum.eval"}),
    ("scoring", False, {"dsum.eval.metrics", "dsum.eval.judge", "dsum.eval.report"}),
    ("data", False, {"dsum.data", "dsum.fetch"}),
    ("model", False, {"dsum.model", "dsum.architectures", "dsum.eval.generate", "dsum.eval.predict"}),
    ("training and evaluation", True, {"dsum.train", "dsum.eval.run"}),
    ("plan", False, {"dsum.plan"}),
]  # fmt: skip


def core_violations(g: dict[str, set[str]]) -> list[str]:
    """Imports inside the core against CORE_LEVELS, and core modules no level names."""
    level = {m: (i, beside) for i, (_, beside, modules) in enumerate(CORE_LEVELS) for m in modules}
    found = [f"{m} is in no level of CORE_LEVELS" for m in sorted(g) if _layer(m) == "core" and m not in level]
    for module in sorted(m for m in g if m in level):
        (i, beside), name = level[module], CORE_LEVELS[level[module][0]][0]
        for imported in sorted(n for n in g[module] if n in level):
            j = level[imported][0]
            if j > i or (j == i and beside):
                found.append(f"{module} ({name}) imports {imported} ({CORE_LEVELS[j][0]})")
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    return next((layer for layer in UPPER if module == layer or module.startswith(layer + ".")), "core")


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (`from dsum import x` counts as dsum.x)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if node.module.startswith("dsum")}
    return out


def graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {i for i in imports_of(path) if i in modules and i != name} for name, path in modules.items()}


def violations(g: dict[str, set[str]], sources: dict[str, set[str]]) -> list[str]:
    found = []
    for module, imported in sources.items():
        rule = RULES[_layer(module)]
        for name in sorted(imported):
            if any(name == f or name.startswith(f + ".") for f in rule["forbidden"]) and _layer(name) != _layer(module):
                found.append(f"{module} imports {name}")
            if name.split(".")[0] in rule["third_party"]:
                found.append(f"{module} imports {name}")
    return found


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle between dsum modules, each as the path that closes it."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for start in sorted(g):
        if start not in state:
            visit(start, [start])
    return found


def test_layers_import_downwards_only():
    sources = {_module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}
    assert violations(graph(), sources) == []


def test_the_core_imports_along_its_levels():
    assert core_violations(graph()) == []


@pytest.mark.parametrize(
    "module, imported, expected",
    [
        ("dsum.data", "dsum.model", "dsum.data (data) imports dsum.model (model)"),
        ("dsum.train", "dsum.eval.run", "dsum.train (training and evaluation) imports dsum.eval.run"),
        ("dsum.eval.run", "dsum.train", "dsum.eval.run (training and evaluation) imports dsum.train"),
        ("dsum.model", "dsum.plan", "dsum.model (model) imports dsum.plan (plan)"),
        ("dsum.eval.new", "dsum.config", "dsum.eval.new is in no level"),
    ],
)
def test_the_core_levels_catch_a_wrong_import(module, imported, expected):
    g = graph()
    g[module] = g.get(module, set()) | {imported}
    assert any(v.startswith(expected) for v in core_violations(g)), core_violations(g)


def test_no_import_cycles():
    assert cycles(graph()) == []


@pytest.mark.parametrize(
    "module,source,expected",
    [
        ("dsum.train", "import ray.train\n", "dsum.train imports ray.train"),
        ("dsum.eval.run", "from dsum.tracking import registry\n", "dsum.eval.run imports dsum.tracking"),
        ("dsum.data", "import mlflow\n", "dsum.data imports mlflow"),
        ("dsum.tracking.track", "from dsum.cluster import launch\n", "dsum.tracking.track imports dsum.cluster"),
    ],
)
def test_the_rules_catch_an_upward_import(tmp_path, module, source, expected):
    bad = tmp_path / "bad.py"
    bad.write_text(source)
    found = violations({}, {module: imports_of(bad)})
    assert any(v.startswith(expected) for v in found), found


def test_the_cycle_search_finds_a_planted_cycle():
    g = graph()
    g["dsum.config"] = g["dsum.config"] | {"dsum.train"}  # train imports config; now config imports train
    assert any(c[0] == c[-1] and {"dsum.config", "dsum.train"} <= set(c) for c in cycles(g)), cycles(g)
