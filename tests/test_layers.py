"""The packages' one-way dependencies (docs/architecture.md), read from the source: every import
(inside functions and under TYPE_CHECKING too), so an import against the layering fails here,
wherever it hides.

    speechgate.core               the foundation: imports nothing else of speechgate
    speechgate.token_service      core                 \\ siblings: the two deployables,
    speechgate.relay              core                 /  neither imports the other
    speechgate.devtools           core, relay          (dev's stand-ins, the demo, the test client)
    speechgate.cli                all of the above     (the `speechgate` command)
"""

from __future__ import annotations

import ast
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "speechgate"
ALLOWED = {
    "core": {"core"},
    "token_service": {"core", "token_service"},
    "relay": {"core", "relay"},
    "devtools": {"core", "relay", "devtools"},
    "cli": {"core", "token_service", "relay", "devtools", "cli"},
}
OLD_TOP_LEVEL = {"token_service", "relay", "core", "devtools", "cli"}  # never top-level names


def imports(path: Path) -> set[str]:
    """The absolute module names `path` imports, `from a.b import c` giving a.b and a.b.c."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; write the whole module name"
            assert node.module is not None
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def subpackage(module: str) -> str | None:
    """speechgate.relay.usp -> relay; speechgate -> None (the namespace itself)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "speechgate" and len(parts) > 1 else None


def python_files(package: str) -> list[Path]:
    return sorted((PACKAGE / package).rglob("*.py"))


def test_every_subpackage_has_a_rule() -> None:
    found = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert found == set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_packages_beneath_it(package: str) -> None:
    wrong = {}
    for path in python_files(package):
        used = {subpackage(m) for m in imports(path)} - {None}
        if used - ALLOWED[package]:
            wrong[str(path.relative_to(ROOT))] = sorted(str(u) for u in used - ALLOWED[package])
    assert wrong == {}


def test_no_code_imports_a_generic_top_level_name() -> None:
    """The wheel installs one top-level package, speechgate; `import relay` would be another's."""
    wrong = {
        str(path.relative_to(ROOT)): sorted(m for m in imports(path) if m.split(".")[0] in OLD_TOP_LEVEL)
        for folder in ("speechgate", "tests", "bench")
        for path in (ROOT / folder).rglob("*.py")
        if any(m.split(".")[0] in OLD_TOP_LEVEL for m in imports(path))
    }
    assert wrong == {}


def module_graph() -> dict[str, set[str]]:
    """Each module of speechgate and the modules of speechgate it imports (for types too)."""
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for path in PACKAGE.rglob("*.py")
    }
    return {name: {m for m in imports(path) if m in modules} - {name} for name, path in modules.items()}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, or None."""
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := walk(target)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)) is not None:
            return found
    return None


def test_no_module_imports_itself_round_a_cycle() -> None:
    """Not even for type hints: a cycle is a pair of modules that cannot be read one at a time.
    (A package's __init__ that gathers its modules counts: `speechgate.cli` imports its groups,
    and a group importing `speechgate.cli` back would be a cycle.)"""
    assert cycle(module_graph()) is None


def test_a_cycle_is_found() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_the_graph_sees_imports_inside_functions() -> None:
    """`speechgate dev`'s imports are inside the command; the graph must still hold them."""
    assert "speechgate.devtools.dev" in module_graph()["speechgate.cli"] | module_graph().get(
        "speechgate.cli.serve", set()
    )


def test_no_test_module_imports_another() -> None:
    """What tests share lives in tests/support and tests/fakes; a test module (or conftest, which
    pytest loads on its own) imported from another would run its tests' imports there too."""
    wrong = {
        str(path.relative_to(ROOT)): sorted(
            m for m in imports(path) if m.split(".")[:2][-1].startswith(("test_", "conftest"))
        )
        for path in (ROOT / "tests").rglob("*.py")
    }
    assert {name: found for name, found in wrong.items() if found} == {}


LONGEST = 400  # lines; a module past it says why at its top, in a paragraph starting "Size:"


def test_a_long_module_says_why_it_is_long() -> None:
    """Test modules are lists of cases and are left out; everything else is code to be read."""
    unexplained = {}
    for folder in ("speechgate", "tests/support", "tests/fakes", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            lines = path.read_text().count("\n")
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            if lines > LONGEST and "\nSize: " not in f"\n{doc}":
                unexplained[str(path.relative_to(ROOT))] = lines
    assert unexplained == {}


def test_the_wheel_installs_one_top_level_package_with_its_resources(tmp_path: Path) -> None:
    """Nothing generic such as `relay` lands in site-packages; the Lua scripts and the demo page,
    read as package resources, are in it."""
    subprocess.run(
        ["uv", "build", "--wheel", "--quiet", "--out-dir", str(tmp_path)], cwd=ROOT, check=True, timeout=300
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"speechgate"}
    resources = {name for name in names if not name.endswith(".py") and "dist-info" not in name}
    assert resources == {
        "speechgate/devtools/demo.html",
        "speechgate/core/lua/revoke_jti.lua",
        "speechgate/relay/lua/admit.lua",
        "speechgate/relay/lua/route.lua",
        "speechgate/relay/lua/beat.lua",
        "speechgate/token_service/lua/rate_hit.lua",
        "speechgate/token_service/lua/rate_read.lua",
    }
