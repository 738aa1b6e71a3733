"""The core knows nothing of its users: its modules import nothing from the packages built on it,
not even inside a function, and telemetry reaches the Guard through the listener protocol the core
defines (gradguard.listeners)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import gradguard
from gradguard import listeners
from gradguard.errors import ConfigError

PACKAGE = Path(gradguard.__file__).parent
#: The core: what a Guard is made of.
CORE = [
    "errors.py",
    "layout.py",
    "stats.py",
    "specgrammar.py",
    "integrity.py",
    "updates.py",
    "snapshot.py",
    "actions.py",
    "skipstep.py",
    "replay.py",
    "listeners.py",
    "attention.py",
    "report.py",
    "guard.py",
    "optim.py",
    "_lazy.py",
    "registries.py",
    *sorted(str(p.relative_to(PACKAGE)) for p in (PACKAGE / "policies").glob("*.py")),
]
#: What is built on the core.
USERS = ("diagnose", "bench", "advice", "keras", "integrations", "faults", "cli")


def imported_modules(path: Path, *, type_checking: bool = True) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (functions too; ``TYPE_CHECKING``
    blocks unless ``type_checking=False``), as absolute names: for ``from m import a``, ``m`` and
    ``m.a``."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1])  # a module's package; a package's __init__: the package
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if (
            not type_checking
            and isinstance(node, ast.If)
            and "TYPE_CHECKING" in ast.unparse(node.test)
        ):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


@pytest.mark.parametrize("module", CORE)
def test_a_core_module_imports_nothing_built_on_the_core(module):
    bad = sorted(
        m
        for m in imported_modules(PACKAGE / module)
        if m.split(".")[:1] == ["gradguard"] and m.split(".")[1:2] and m.split(".")[1] in USERS
    )
    assert bad == [], f"{module} imports {bad}"


def test_the_import_scan_sees_imports_inside_functions(tmp_path):
    """The scan is not fooled by an import tucked into a function (the mutation it guards)."""
    fake = PACKAGE / "policies" / "_scan_probe.py"
    try:
        fake.write_text("def f():\n    from ..diagnose.telemetry import Telemetry\n")
        assert "gradguard.diagnose.telemetry" in imported_modules(fake)
    finally:
        fake.unlink()


def _is_module(name: str) -> bool:
    """Whether ``gradguard.x`` names a module or subpackage (not a name defined in the root)."""
    leaf = name.split(".")[1]
    return (PACKAGE / f"{leaf}.py").exists() or (PACKAGE / leaf / "__init__.py").exists()


def _unit(module: str) -> str:
    """The top-level module or subpackage a module belongs to (``gradguard`` for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "gradguard"


def test_no_import_cycle_between_the_packages_modules_and_subpackages():
    """The graph of runtime imports between gradguard's top-level modules and subpackages has no
    cycle, and nothing imports the package's top level (the facade that loads the rest) but
    ``__main__``; a cycle found is printed as a path."""
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        src = _unit(".".join(p for p in rel.parts if p != "__init__"))
        for target in imported_modules(path, type_checking=False):
            if not target.startswith("gradguard."):
                continue  # the package itself is imported before any of its modules anyway
            if target.count(".") == 1 and not _is_module(target):
                target = "gradguard"  # a name from the top level (``from .. import x``)
            dst = _unit(target)
            if dst != src:
                edges.setdefault(src, set()).add(dst)
    into_root = sorted(u for u, ts in edges.items() if "gradguard" in ts and u != "__main__")
    assert into_root == [], f"{into_root} import the package's top level"
    graph = {u: ts - {"gradguard"} for u, ts in edges.items() if u != "gradguard"}
    state: dict[str, int] = {}

    def cycle_from(u: str, path: list[str]) -> list[str] | None:
        state[u] = 1
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return [*path, u, v]
            if v not in state and (found := cycle_from(v, [*path, u])):
                return found
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state:
            found = cycle_from(u, [])
            assert found is None, "import cycle: " + " -> ".join(found)
    assert {"guard", "policies", "bench", "keras"} <= set(graph)


class Recorder:
    """A listener of one's own: what the Guard tells it, in order."""

    def __init__(self):
        self.calls: list[tuple] = []
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def bind(self, guard):
        self.calls.append(("bind", type(guard).__name__))

    def wants_update_ratio(self, step):
        return step % 2 == 0

    def before_update(self, stats):
        self.calls.append(("before_update", len(stats.grads)))

    def after_step(self, guard, ctx, stats, report, stepped, localization=None):
        self.calls.append(("after_step", ctx.step, stepped, report.skipped))

    def close(self, counters=None):
        self.calls.append(("close", dict(counters or {})["steps"]))
        self._closed = True


def _train(guard, model, opt, steps, nan_at=None):
    torch.manual_seed(0)
    for step in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).mean().backward()
        if step == nan_at:
            model.weight.grad[0, 0] = float("nan")
        guard.step()


def test_any_listener_gets_every_step_through_the_protocol():
    rec = Recorder()
    assert isinstance(rec, listeners.StepListener)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gradguard.Guard(model, opt, "default", telemetry=rec)
    _train(guard, model, opt, 4, nan_at=1)
    guard.close()
    guard.close()  # closed once
    assert rec.calls == [
        ("bind", "Guard"),
        ("before_update", 2),
        ("after_step", 0, True, False),
        ("after_step", 1, False, True),  # skipped: no update to measure
        ("before_update", 2),
        ("after_step", 2, True, False),
        ("after_step", 3, True, False),
        ("close", 4),
    ]


def test_log_dir_asks_the_installed_factory(tmp_path):
    made = []

    def factory(log_dir):
        made.append(Path(log_dir))
        return Recorder()

    previous = listeners.set_log_dir_listener(factory)
    try:
        model = nn.Linear(3, 2)
        guard = gradguard.Guard(
            model, torch.optim.SGD(model.parameters(), lr=0.1), log_dir=tmp_path
        )
        assert made == [tmp_path] and isinstance(guard.telemetry, Recorder)
        listeners.set_log_dir_listener(None)
        with pytest.raises(ConfigError, match=r"log_dir.*telemetry=gradguard.diagnose.Telemetry"):
            gradguard.Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), log_dir=tmp_path)
    finally:
        listeners.set_log_dir_listener(previous)


def test_the_package_installs_the_diagnosis_telemetry(tmp_path):
    from gradguard.diagnose import Telemetry

    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, log_dir=tmp_path) as guard:
        assert isinstance(guard.telemetry, Telemetry)
        _train(guard, model, opt, 2)
    assert (tmp_path / "telemetry.jsonl").exists()
