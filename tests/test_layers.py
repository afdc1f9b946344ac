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
