"""Arrows point one way: ``balancer`` and ``node`` use ``common`` and never each other; nothing in the
product imports the dev tooling, the tests or the benchmarks; dev tooling and benchmarks never import
the tests. Every module's imports are parsed (not executed), lazy ones inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = ("common", "balancer", "node", "devkit", "bench", "tests")
# package -> the top-level packages its modules may not import
FORBIDDEN: dict[str, frozenset[str]] = {
    "common": frozenset({"balancer", "node", "devkit", "bench", "tests"}),
    "balancer": frozenset({"node", "devkit", "bench", "tests"}),
    "node": frozenset({"balancer", "devkit", "bench", "tests"}),
    "devkit": frozenset({"bench", "tests"}),
    "bench": frozenset({"tests"}),
    "tests": frozenset({"bench"}),
}


def imported_packages(source: str, module: str) -> set[str]:
    """The top-level package of every module ``source`` imports (relative imports resolved)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside the importing package
                found.add(module.split(".")[0])
            elif node.module:
                found.add(node.module.split(".")[0])
    return found


def wrong_way_imports(root: Path) -> list[str]:
    """``"<file> imports <package>"`` for every import the rules above forbid, under ``root``."""
    wrong = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root)
            module = ".".join(relative.with_suffix("").parts)
            for imported in sorted(imported_packages(path.read_text(encoding="utf-8"), module) & forbidden):
                wrong.append(f"{relative} imports {imported}")
    return wrong


def test_every_package_imports_only_the_way_its_arrow_points() -> None:
    assert [p for p in TOP_LEVEL if not (ROOT / p).is_dir()] == []
    assert wrong_way_imports(ROOT) == []


@pytest.mark.parametrize(
    ("package", "source", "caught"),
    [
        ("balancer", "from node.runtimes.piper import PiperRuntime\n", "node"),
        ("node", "def late():\n    import balancer.cli\n", "balancer"),
        ("common", "from devkit import packaged_models\n", "devkit"),
        ("bench", "from tests.fixtures.models import CACHE\n", "tests"),
        ("devkit", "import tests.fixtures.models as m\n", "tests"),
    ],
)
def test_a_wrong_way_import_is_caught_even_inside_a_function(
    tmp_path: Path, package: str, source: str, caught: str
) -> None:
    (tmp_path / package).mkdir()
    (tmp_path / package / "bad.py").write_text(source)
    assert wrong_way_imports(tmp_path) == [f"{package}/bad.py imports {caught}"]


# The replication carries changes between replicas and knows no owner of state: the owners subscribe
# to the change bus, never the reverse. So nothing the replication imports, however indirectly (lazy
# and type-checking imports included), is the parts or an owner, and no loop runs through the parts.
REPLICATION = ("balancer.replicas", "balancer.changes")
STATE_OWNERS = (
    "balancer.parts",
    "balancer.catalog",
    "balancer.auth",
    "balancer.fleet.view",
    "balancer.fleet.sessions",
    "balancer.fleet.rows",
    "balancer.fleet.protocol",
    "balancer.fleet.owners",
    "balancer.fleet.nodes",
)


def imported_modules(source: str, module: str, *, package: bool = False) -> set[str]:
    """Every module ``source`` may import, dotted in full (``from a import b`` counts ``a`` and ``a.b``);
    ``package``: ``source`` is the module's ``__init__.py``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to the importing module's package
                up = node.level - 1 if package else node.level
                package_parts = module.split(".")
                package_parts = package_parts[: len(package_parts) - up]
                base = ".".join([*package_parts, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _source_of(root: Path, module: str) -> Path | None:
    path = root.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _owner_of(module: str) -> str | None:
    return next((o for o in STATE_OWNERS if module == o or module.startswith(o + ".")), None)


def replication_reaching_owners(root: Path) -> list[str]:
    """``"<module> -> ... imports <owner>"`` for every owner of state a replication module reaches."""
    wrong: list[str] = []
    seen: set[str] = set()
    queue: list[tuple[str, tuple[str, ...]]] = [(start, (start,)) for start in REPLICATION]
    while queue:
        module, chain = queue.pop(0)
        if module in seen:
            continue
        seen.add(module)
        path = _source_of(root, module)
        if path is None:
            continue
        source = path.read_text(encoding="utf-8")
        for imported in sorted(imported_modules(source, module, package=path.name == "__init__.py")):
            owner = _owner_of(imported)
            if owner is not None:
                wrong.append(f"{' -> '.join(chain)} imports {owner}")
            elif imported.startswith("balancer"):
                parts = imported.split(".")  # the packages above a module run first
                queue.extend((".".join(parts[:n]), (*chain, imported)) for n in range(1, len(parts) + 1))
    return sorted(set(wrong))


def test_the_replication_reaches_no_owner_of_state_and_no_loop_runs_through_the_parts() -> None:
    assert (
        _source_of(ROOT, "balancer.replicas") is not None and _source_of(ROOT, "balancer.changes") is not None
    )
    assert replication_reaching_owners(ROOT) == []


@pytest.mark.parametrize(
    ("files", "caught"),
    [
        (  # the change bus reaching into the catalogue
            {"balancer/changes.py": "from balancer.catalog import Catalog\n"},
            ["balancer.changes imports balancer.catalog"],
        ),
        (  # the replicas calling the key ring or the catalogue back, even lazily
            {"balancer/replicas.py": "def later():\n    from balancer import auth, catalog\n"},
            ["balancer.replicas imports balancer.auth", "balancer.replicas imports balancer.catalog"],
        ),
        (  # a loop between the parts and the replicas, if only for type checking
            {
                "balancer/parts.py": "from balancer.replicas import Replicas\n",
                "balancer/replicas.py": (
                    "from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n"
                    "    from balancer.parts import BalancerParts\n"
                ),
            },
            ["balancer.replicas imports balancer.parts"],
        ),
        (  # an owner reached through a module the replicas use
            {
                "balancer/replicas.py": "from balancer.store import Store\n",
                "balancer/store/__init__.py": "from .records import Store\n",
                "balancer/store/records.py": "from balancer.fleet.view import NodeLoad\n",
            },
            ["balancer.replicas -> balancer.store -> balancer.store.records imports balancer.fleet.view"],
        ),
    ],
)
def test_a_replication_module_reaching_an_owner_of_state_is_caught(
    tmp_path: Path, files: dict[str, str], caught: list[str]
) -> None:
    for name, source in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    assert replication_reaching_owners(tmp_path) == caught


# The doors reach routing only through the inference plane (``balancer.edge.plane``), which exports all
# a door may name: a door importing the router could route, count or limit past the plane.
DOORS = ("balancer/http/*.py", "balancer/servicers/inference.py")
ROUTER = "balancer.router"


def router_imports(source: str) -> list[str]:
    """The ``balancer.router`` modules ``source`` imports, lazy ones inside functions included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name == ROUTER or a.name.startswith(ROUTER + ".")]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module == ROUTER or node.module.startswith(ROUTER + "."):
                found.append(node.module)
            elif node.module == "balancer" and any(a.name == "router" for a in node.names):
                found.append(ROUTER)
    return found


def doors_importing_the_router(root: Path) -> list[str]:
    """``"<file> imports <module>"`` for every door module that imports the router."""
    paths = sorted({path for pattern in DOORS for path in root.glob(pattern)})
    return [
        f"{path.relative_to(root)} imports {module}"
        for path in paths
        for module in router_imports(path.read_text(encoding="utf-8"))
    ]


def test_the_doors_reach_the_router_only_through_the_inference_plane() -> None:
    assert doors_importing_the_router(ROOT) == []


@pytest.mark.parametrize(
    ("door", "source", "caught"),
    [
        ("http/openai_routes.py", "from balancer.router import Router\n", "balancer.router"),
        (
            "http/x.py",
            "def late():\n    from balancer.router.queue import WaitQueue\n",
            "balancer.router.queue",
        ),
        ("servicers/inference.py", "import balancer.router.routing\n", "balancer.router.routing"),
        ("servicers/inference.py", "from balancer import router\n", "balancer.router"),
    ],
)
def test_a_door_importing_router_internals_is_caught(
    tmp_path: Path, door: str, source: str, caught: str
) -> None:
    (tmp_path / "balancer" / door).parent.mkdir(parents=True)
    (tmp_path / "balancer" / door).write_text(source)
    assert doors_importing_the_router(tmp_path) == [f"balancer/{door} imports {caught}"]
