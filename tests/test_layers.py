"""The import directions of DESIGN.md's module map, and an edge that imports only an edge's needs."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mist_fed"

# package -> the mist_fed packages its modules may import at module level
ALLOWED = {
    "core": {"core", "errors", "registry"},
    "wire": {"core", "wire", "errors", "registry"},
    "device": {"core", "wire", "device", "errors", "registry", "defaults"},
}


def _imports(path: Path) -> set[str]:
    """The mist_fed packages a module imports at module level (not inside functions)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "mist_fed" and len(parts) > 1:
                out.add(parts[1])
    return out


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_module_imports_a_layer_above_its_own(package):
    bad = {
        str(p.relative_to(PKG)): sorted(_imports(p) - ALLOWED[package])
        for p in (PKG / package).glob("*.py")
        if _imports(p) - ALLOWED[package]
    }
    assert not bad, bad


def test_the_edge_imports_no_cloud_fleet_or_report_libraries():
    code = (
        "import sys, mist_fed.device.client, mist_fed.device.edge\n"
        "heavy = ('timm', 'torchvision', 'flwr', 'ray', 'pandas', 'matplotlib', 'mist_fed.model',"
        " 'mist_fed.cloud', 'mist_fed.data', 'torch.utils.flop_counter')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _fleet_imports(path: Path) -> set[str]:
    """The ``mist_fed.fleet`` modules a module imports anywhere (inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "mist_fed.fleet":
                out |= {a.name for a in node.names}
            elif node.module.startswith("mist_fed.fleet."):
                out.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            out |= {
                a.name.split(".")[2] for a in node.names if a.name.startswith("mist_fed.fleet.")
            }
    return out


def test_the_fleet_modules_import_each_other_without_a_cycle():
    # Prepare: fleet module -> the fleet modules it imports, at module level or in a function
    graph = {p.stem: _fleet_imports(p) - {p.stem} for p in (PKG / "fleet").glob("*.py")}
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
    assert "run" in graph and "server_app" in graph["run"]  # the graph is the real one
    assert cycles == []
