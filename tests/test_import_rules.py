"""The layer rules of docs/architecture.md, checked on the source: dependencies point downward
(ui/api -> engine -> networks -> families/layouts/arch), `networks` never imports gradio or the engine,
`prompt.py` imports nothing of ours, `layouts` imports only torch and the standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "webui"

# layer of each part of `webui`, lowest first; a module may import only its own layer and lower
LAYERS: dict[str, int] = {
    "webui.arch": 0,
    "webui.prompt": 0,
    "webui.layouts": 1,
    "webui.families": 1,
    "webui.settings": 1,
    "webui.networks": 2,
    "webui.engine": 3,
    "webui.api": 4,
    "webui.ui": 4,
    "webui.server": 5,
    "webui.cluster": 6,  # the front serves webui.server's app over Ray replicas
}
# what a part may import beyond the standard library and `webui` (None: anything)
THIRD_PARTY: dict[str, frozenset[str] | None] = {
    "webui.prompt": frozenset(),
    "webui.arch": frozenset(),
    "webui.layouts": frozenset({"torch"}),
}
NEVER: dict[str, frozenset[str]] = {
    "webui.networks": frozenset({"gradio", "fastapi", "uvicorn", "ray"}),
    "webui.engine": frozenset({"gradio", "fastapi", "uvicorn", "ray"}),
    # Ray is an optional install: only webui.cluster may import it
    **{
        part: frozenset({"ray"})
        for part in (
            "webui.arch",
            "webui.prompt",
            "webui.layouts",
            "webui.families",
            "webui.settings",
            "webui.api",
            "webui.ui",
            "webui.server",
        )
    },
}
# sub-packages entered only through their `__init__` from outside `webui.networks`
DOORS = ("webui.networks.format", "webui.networks.library", "webui.networks.apply")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(name: str) -> str | None:
    """The entry of LAYERS a module belongs to (the longest matching prefix)."""
    matches = [p for p in LAYERS if name == p or name.startswith(p + ".")]
    return max(matches, key=len) if matches else None


def imports(source: str, name: str, is_package: bool) -> list[tuple[str, int]]:
    """(imported module, line) for every import in module `name`, relative imports resolved;
    imports under `if TYPE_CHECKING:` count too (they are still a dependency of the design)."""
    tree = ast.parse(source, name)
    package = name if is_package else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((target, node.lineno))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def violations(source: str, name: str, is_package: bool = False) -> list[str]:
    """Every broken rule in the source of module `name`, one line each."""
    own = part_of(name)
    if own is None:
        return []
    problems = []
    for target, line in imports(source, name, is_package):
        top = target.split(".")[0]
        where = f"{name}:{line} imports {target}"
        door = next((d for d in DOORS if target.startswith(d + ".")), None)
        if door is not None and not name.startswith("webui.networks."):
            problems.append(f"{where}: import from {door} (its __init__ is its only door)")
        if top == "webui":
            other = part_of(target)
            if other is not None and LAYERS[other] > LAYERS[own]:
                problems.append(f"{where}: {own} may not depend on {other} (a higher layer)")
            if own in THIRD_PARTY and THIRD_PARTY[own] == frozenset() and other not in (None, own):
                problems.append(f"{where}: {own} imports nothing of ours")
        elif top in sys.stdlib_module_names or top == "__future__":
            continue
        else:
            allowed = THIRD_PARTY.get(own)
            if allowed is not None and top not in allowed:
                problems.append(f"{where}: {own} may import only {sorted(allowed) or 'stdlib'}")
            if top in NEVER.get(own, frozenset()):
                problems.append(f"{where}: {own} never imports {top}")
    return problems


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_keeps_the_layer_rules(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    assert violations(source, module_name(path), path.name == "__init__.py") == []


def test_every_module_belongs_to_a_layer() -> None:
    """A new top-level part of `webui` must be given its place in the rules."""
    orphans = [
        str(p.relative_to(ROOT))
        for p in SOURCES
        if p.name != "__init__.py" or p.parent != PACKAGE
        if part_of(module_name(p)) is None
    ]
    assert orphans == []


def test_the_checker_catches_a_broken_rule() -> None:
    """The rule check itself: a networks module importing the engine or gradio is caught, and
    so is prompt.py importing anything of ours or a third-party package."""
    source = "import gradio\nfrom webui.engine.generate import Engine\nfrom ..ui import blocks\n"
    found = violations(source, "webui.networks.probe")
    assert any("never imports gradio" in p for p in found)
    assert any("webui.engine" in p and "higher layer" in p for p in found)
    assert any("webui.ui" in p and "higher layer" in p for p in found)
    prompt = violations("import re\nimport torch\nfrom .arch import Arch\n", "webui.prompt")
    assert len(prompt) == 2, prompt
    assert violations("import re\nfrom collections import abc\n", "webui.prompt") == []


def test_the_checker_catches_an_inner_module_import() -> None:
    """Outside webui.networks, format/library/apply are entered only by their `__init__`;
    inside webui.networks the inner modules may import each other."""
    inner = "from webui.networks.apply.patcher import NetworkPatcher\n"
    assert any("only door" in p for p in violations(inner, "webui.engine.probe"))
    door = "from webui.networks.apply import NetworkPatcher\n"
    assert violations(door, "webui.engine.probe") == []
    assert violations(inner, "webui.networks.library.probe") == []


def import_graph() -> dict[str, set[str]]:
    """Module -> the `webui` modules it imports (at any depth of the file, type-checking-only
    imports too: a circle of types is still a circle in the design)."""
    names = {module_name(p): p for p in SOURCES}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        targets = {t for t, _ in imports(source, name, path.name == "__init__.py")}
        # `from package import module` names a module too
        graph[name] = {
            n for t in targets for n in (t, *(f"{t}.{a}" for a in _imported_names(tree, t)))
        } & set(names)
        graph[name].discard(name)
    return graph


def _imported_names(tree: ast.Module, target: str) -> list[str]:
    return [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").endswith(target.split(".")[-1])
        for alias in node.names
    ]


def test_no_import_circles() -> None:
    """No two modules of ours import each other, directly or around a circle."""
    graph = import_graph()
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph.get(name, ())):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []
