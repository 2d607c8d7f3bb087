"""The import direction of the layers, read from the source (ast), not by importing it.

pipeline -> components -> ml, and inside ml: train / eval -> model -> (torch);
data stands alone. Inside pipeline (README, "Architecture"): cli -> dags | serving ->
registry -> core. No import cycles anywhere, and no module imports another module's private
(``_name``) names. Every import counts, including those inside functions (imported on
demand is still a dependency). Imports under ``if TYPE_CHECKING:`` obey the layer rules
too, but do not make a cycle (they never run).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ml", "components", "pipeline")


@dataclass(frozen=True)
class Import:
    """One imported module name, where it is imported."""

    module: str  # the importing module, dotted
    target: str  # the imported module, dotted (``from a import b``: ``a.b`` when that is a module)
    line: int
    type_only: bool = False  # under ``if TYPE_CHECKING:``
    name: str = ""  # ``from a import name`` where name is not a module


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _targets(node: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, str]]:
    """(imported module, imported name or "") of an import statement."""
    if isinstance(node, ast.Import):
        yield from ((alias.name, "") for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolve against the importing package
            package = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
            base = ".".join([*package, base] if base else package)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            yield (sub, "") if _is_module(sub) else (base, alias.name)


def _type_checking_nodes(tree: ast.AST) -> set[ast.AST]:
    """The nodes inside ``if TYPE_CHECKING:`` blocks."""
    inside: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                inside.update(ast.walk(child))
    return inside


def _imports() -> list[Import]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = _module_name(path)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            type_only = _type_checking_nodes(tree)
            for node in ast.walk(tree):
                for target, name in _targets(node, module, path.name == "__init__.py"):
                    found.append(Import(module, target, getattr(node, "lineno", 0), node in type_only, name))
    return found


IMPORTS = _imports()


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# (importing layer, layers it must not import)
FORBIDDEN = [
    ("ml", ("kfp", "mlflow", "components", "pipeline")),
    ("ml.model", ("ml.train", "ml.eval")),
    ("ml.data", ("ml.model", "ml.train", "ml.eval")),
    ("components", ("pipeline",)),
    ("pipeline.core", ("pipeline.registry", "pipeline.dags", "pipeline.serving", "pipeline.cli")),
    ("pipeline.registry", ("pipeline.dags", "pipeline.serving", "pipeline.cli")),
    ("pipeline.dags", ("pipeline.serving", "pipeline.cli")),
    ("pipeline.serving", ("pipeline.dags", "pipeline.cli")),
]


@pytest.mark.parametrize(("layer", "forbidden"), FORBIDDEN, ids=[layer for layer, _ in FORBIDDEN])
def test_layer_does_not_reach_up_or_sideways(layer: str, forbidden: tuple[str, ...]) -> None:
    bad = sorted(
        {
            f"{i.module}:{i.line} imports {i.target}"
            for i in IMPORTS
            if _under(i.module, layer) and any(_under(i.target, f) for f in forbidden)
        }
    )
    assert not bad, "\n".join(bad)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package: str) -> None:
    graph: dict[str, set[str]] = {}
    for i in IMPORTS:
        if (
            not i.type_only
            and _under(i.module, package)
            and _under(i.target, package)
            and i.target != i.module
            and _is_module(i.target)
        ):
            graph.setdefault(i.module, set()).add(i.target)
    # a package's __init__ is not a dependency of the modules below it
    graph = {m: {t for t in ts if not _under(m, t)} for m, ts in graph.items()}
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_checker_sees_imports() -> None:
    """Guard against a checker that finds nothing (a wrong root, a parse that skips)."""
    assert ("ml.train.trainer", "ml.model.lora") in {(i.module, i.target) for i in IMPORTS}
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_another_modules_private_names() -> None:
    """What a module shares is public; a command module reaching into another's ``_helpers``
    is how the CLI grew its cycles."""
    bad = sorted(
        f"{i.module}:{i.line} imports {i.name} from {i.target}"
        for i in IMPORTS
        if i.name.startswith("_") and not i.name.startswith("__") and i.target != i.module and _is_module(i.target)
    )
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", ["ml", "components"])
def test_steps_never_call_up_into_the_command_line(package: str) -> None:
    """Steps are started by the pipeline, never the other way round: nothing below pipeline/
    runs ``python -m pipeline.cli`` as a subprocess."""
    bad = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / package).rglob("*.py"))
        if any(call in path.read_text(encoding="utf-8") for call in ('"pipeline.cli"', "'pipeline.cli'"))
    ]
    assert not bad, f"{package} starts the command line: {bad}"
