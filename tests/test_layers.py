"""The import directions of DESIGN.md's module map, over every package, and an edge that imports
only an edge's needs.

``core`` <- ``wire`` <- ``cloud`` / ``device`` <- ``fleet`` / ``experiments`` <- ``cli``, with
``assets`` (defaults, the offline switch, where weights come from) under every package,
``data`` (tasks on disk) and ``report`` beside them. Inside
``fleet``: the domain (``fleet/*.py``) <- ``fleet/runtime/`` <- ``fleet/flower/``; only
``fleet/flower/`` imports ``flwr`` (or Flower Datasets), and the domain imports no ``ray``. Imports are read
anywhere in a module, inside functions too: a lazy import still points one way.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mist_fed"

BASE = {"errors", "registry", "files", "assets"}  # the foundations every package may use
# package -> the mist_fed packages its modules may import (anywhere)
ALLOWED = {
    "errors": set(),
    "registry": {"errors"},
    "files": set(),
    "assets": {"errors", "files"},
    "core": BASE,
    "wire": BASE | {"core"},
    "data": BASE,
    "report": BASE,
    "cloud": BASE | {"core", "wire", "data"},
    "device": BASE | {"core", "wire", "data"},
    "fleet": BASE | {"core", "wire", "data", "report", "cloud", "device"},
    "experiments": BASE | {"core", "wire", "data", "report", "cloud", "device"},
    "commands": BASE
    | {
        "core",
        "wire",
        "data",
        "report",
        "cloud",
        "device",
        "fleet",
        "experiments",
    },
    "cli": {"errors", "commands"},
}


def _imported(path: Path) -> set[str]:
    """Every module name a file imports, anywhere in it (absolute imports: the package's own)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _package(path: Path) -> str:
    top = path.relative_to(PKG).parts[0]
    return top.removesuffix(".py")


def _packages_used(path: Path) -> set[str]:
    return {
        name.split(".")[1]
        for name in _imported(path)
        if name.startswith("mist_fed.") and name.split(".")[1] in ALLOWED
    } - {_package(path)}


def test_every_package_is_in_the_map() -> None:
    # Assert: a new package must be placed in the map (and so in a layer) before it lands
    found = {_package(p) for p in PKG.glob("*") if p.name != "__init__.py" and p.name[0] != "_"}
    found = {f for f in found if (PKG / f).is_dir() or (PKG / f"{f}.py").is_file()}
    assert found - {"__pycache__"} == set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_module_imports_a_layer_above_its_own(package: str) -> None:
    # Prepare
    files = [PKG / f"{package}.py"] if (PKG / f"{package}.py").is_file() else []
    files += sorted((PKG / package).rglob("*.py")) if (PKG / package).is_dir() else []
    assert files
    # Execute
    bad = {
        str(p.relative_to(PKG)): sorted(_packages_used(p) - ALLOWED[package])
        for p in files
        if _packages_used(p) - ALLOWED[package]
    }
    # Assert
    assert not bad, bad


def _fleet_part(path: Path) -> str:
    parts = path.relative_to(PKG / "fleet").parts
    return parts[0] if len(parts) > 1 else "domain"


def _fleet_parts_used(path: Path) -> set[str]:
    out = set()
    for name in _imported(path):
        parts = name.split(".")
        if parts[:2] == ["mist_fed", "fleet"] and len(parts) > 2:
            out.add(parts[2] if parts[2] in ("flower", "runtime") else "domain")
    return out


def test_inside_the_fleet_the_domain_imports_neither_adapter_and_runtime_no_flower() -> None:
    # Prepare: domain <- runtime <- flower (the registry loads Flower's strategies by name)
    allowed = {"domain": {"domain"}, "runtime": {"domain", "runtime"},
               "flower": {"domain", "runtime", "flower"}}  # fmt: skip
    files = sorted((PKG / "fleet").rglob("*.py"))
    # Execute
    bad = {
        str(p.relative_to(PKG)): sorted(_fleet_parts_used(p) - allowed[_fleet_part(p)])
        for p in files
        if _fleet_parts_used(p) - allowed[_fleet_part(p)]
    }
    # Assert
    assert {_fleet_part(p) for p in files} == set(allowed)  # the parts are the real ones
    assert not bad, bad


def _third_party(path: Path, top: str) -> bool:
    return any(name == top or name.startswith(f"{top}.") for name in _imported(path))


def test_only_the_flower_adapters_import_flwr_and_the_fleet_domain_no_ray() -> None:
    # Execute
    flower = ("flwr", "flwr_datasets")  # Flower and Flower Datasets
    flwr = sorted(
        str(p.relative_to(PKG))
        for p in PKG.rglob("*.py")
        if any(_third_party(p, top) for top in flower)
    )
    ray = sorted(
        str(p.relative_to(PKG)) for p in (PKG / "fleet").glob("*.py") if _third_party(p, "ray")
    )
    # Assert
    assert flwr and all(p.startswith("fleet/flower/") for p in flwr), flwr
    assert ray == []


def test_the_edge_imports_no_cloud_fleet_or_report_libraries():
    code = (
        "import sys, mist_fed.device.client, mist_fed.device.edge\n"
        "heavy = ('timm', 'torchvision', 'flwr', 'ray', 'pandas', 'matplotlib',"
        " 'mist_fed.cloud', 'mist_fed.data', 'torch.utils.flop_counter')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _fleet_modules(path: Path) -> set[str]:
    """The ``mist_fed.fleet`` modules a module imports anywhere, by dotted name below fleet."""
    known = {_fleet_name(p) for p in (PKG / "fleet").rglob("*.py")}
    out = set()
    for name in _imported(path):
        if name.startswith("mist_fed.fleet."):
            rest = name.removeprefix("mist_fed.fleet.")
            while rest and rest not in known:
                rest = rest.rpartition(".")[0]
            if rest:
                out.add(rest)
    return out


def _fleet_name(path: Path) -> str:
    return ".".join(path.relative_to(PKG / "fleet").with_suffix("").parts)


def test_the_fleet_modules_import_each_other_without_a_cycle():
    # Prepare: fleet module -> the fleet modules it imports, at module level or in a function
    graph = {
        _fleet_name(p): _fleet_modules(p) - {_fleet_name(p)} for p in (PKG / "fleet").rglob("*.py")
    }
    # Execute: depth-first search for a back edge
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    # Assert
    assert "runtime.session" in graph["flower.simulation"]  # the graph is the real one
    assert "rounds" in graph["runtime.session"]
    assert cycles == []


def test_no_two_modules_share_a_name_and_none_is_over_450_lines():
    # Prepare: every module of the package but __init__.py, commands/ and bench.py (the names
    # that say the same thing everywhere: one module per subcommand, each package's benchmark)
    modules = [p for p in PKG.rglob("*.py") if p.name not in ("__init__.py", "bench.py")]
    named: dict[str, list[str]] = {}
    for p in modules:
        if p.relative_to(PKG).parts[0] != "commands":
            named.setdefault(p.name, []).append(str(p.relative_to(PKG)))
    # Execute
    shared = {n: paths for n, paths in named.items() if len(paths) > 1}
    long = {
        str(p.relative_to(PKG)): n for p in modules if (n := len(p.read_text().splitlines())) > 450
    }
    # Assert
    assert shared == {}, shared
    assert long == {}, long
