"""The package's import graph: no circle, and the bottom floors import nothing above them.

Read from the source with ``ast`` (no interpreter per module): every ``import``
statement counts, those inside functions too, since a lazy import that closes a
circle is still a circle in the design — except in a module-level ``__getattr__``
that keeps moved names importable from their old place.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set

import pytest
import torch
from torch import nn

import distnorm
import distnorm._packing

ROOT = Path(distnorm.__file__).resolve().parent
PACKAGE = ROOT.name


def _modules() -> Dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _walk(tree: ast.Module) -> Iterator[ast.AST]:
    """Every node of ``tree`` but those of a module-level ``__getattr__`` (PEP 562):
    it resolves names kept for compatibility on first use, after both modules are
    loaded (``distnorm.modules.AdaIN`` from ``distnorm.catalogue``)."""
    for top in tree.body:
        if isinstance(top, ast.FunctionDef) and top.name == "__getattr__":
            continue
        yield from ast.walk(top)


def _imports(name: str, path: Path) -> Set[str]:
    """The distnorm modules ``name`` imports (a name imported from a package counts as
    its submodule when there is one, else as the package)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: Set[str] = set()
    for node in _walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in MODULES else source)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycle() -> List[str]:
    """One import circle of GRAPH (as a path that returns to its start), or []."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return []

    for start in sorted(GRAPH):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return []


def test_graph_is_read():
    assert f"{PACKAGE}.registry" in GRAPH and f"{PACKAGE}.convert" in GRAPH
    assert f"{PACKAGE}.registry" in GRAPH[f"{PACKAGE}.modules.sync_batch_norm"]
    assert f"{PACKAGE}.modules" in GRAPH[f"{PACKAGE}.convert"]


def test_no_import_circle():
    cycle = _cycle()
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_registry_is_the_bottom_floor():
    assert GRAPH[f"{PACKAGE}.registry"] == set()


def test_layers_do_not_import_the_top_level_api():
    top = {f"{PACKAGE}.convert", f"{PACKAGE}.check", PACKAGE}
    for name, deps in GRAPH.items():
        if name.startswith(f"{PACKAGE}.modules"):
            assert not deps & top, f"{name} imports {sorted(deps & top)}"


def test_public_registry_names_are_kept():
    assert distnorm.register_variant is distnorm.registry.register_variant
    assert distnorm.variants is distnorm.registry.variants
    assert distnorm.variants()["sync"] is distnorm.SyncBatchNorm


def test_revert_model_asks_each_layer():
    """revert_model replaces whatever has a to_batch_norm(), distnorm's or not, and
    names the layer when it refuses."""
    class Own(nn.Module):
        def __init__(self, refuse: bool = False) -> None:
            super().__init__()
            self.refuse = refuse

        def to_batch_norm(self) -> nn.Module:
            if self.refuse:
                raise ValueError("no statistics here")
            return nn.BatchNorm1d(3)

    model = nn.Sequential(nn.Linear(2, 3), Own(), nn.Sequential(distnorm.SyncBatchNorm(3)))
    distnorm.revert_model(model)
    assert type(model[1]) is nn.BatchNorm1d and type(model[2][0]) is nn.BatchNorm2d
    refusing = nn.Sequential()
    refusing.add_module("inner", nn.Sequential(Own(refuse=True)))
    with pytest.raises(ValueError, match=r"cannot revert Own 'inner.0' to BatchNorm: no statistics"):
        distnorm.revert_model(refusing)


def test_catalogue_sits_above_the_batch_norm_family():
    for name, deps in GRAPH.items():
        if name.startswith(f"{PACKAGE}.modules") or name == f"{PACKAGE}.registry":
            assert not any(d.startswith(f"{PACKAGE}.catalogue") for d in deps), name


@pytest.mark.parametrize("name", ["AdaIN", "ConditionalBatchNorm", "ConditionalInstanceNorm",
                                  "CosineNorm", "FilterResponseNorm", "PositionalNorm", "SPADE",
                                  "moment_shortcut"])
def test_catalogue_names_keep_their_old_homes(name):
    import distnorm.modules

    moved = getattr(distnorm.catalogue, name)
    assert getattr(distnorm, name) is moved
    assert getattr(distnorm.modules, name) is moved
    namespace: Dict[str, object] = {}
    exec(f"from distnorm.modules import {name}", namespace)
    assert namespace[name] is moved
    if isinstance(moved, type):
        assert moved.__module__.startswith(f"{PACKAGE}.catalogue.")


def test_check_model_still_knows_the_catalogue():
    from distnorm.check import is_distnorm_layer

    assert is_distnorm_layer(distnorm.AdaIN()) and is_distnorm_layer(distnorm.SPADE(4, 2))


def test_unknown_names_still_raise_attribute_error():
    import distnorm.modules

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        distnorm.modules.Nope  # noqa: B018


def test_compat_is_a_bottom_floor_and_holds_the_private_reads():
    assert GRAPH[f"{PACKAGE}._compat"] == set()
    for name, path in MODULES.items():
        if name != f"{PACKAGE}._compat":
            text = path.read_text(encoding="utf-8")
            assert "._saved_" not in text and "_dynamo.config" not in text, name


def test_cross_iteration_mode_has_an_unambiguous_alias():
    from torch import nn as _nn

    layer = distnorm.convert_model(_nn.Sequential(_nn.BatchNorm2d(3)), mode="cross_iteration")
    assert type(layer[0]) is distnorm.CrossIterationBatchNorm
    assert "cross_iteration" not in distnorm.variants()
    with pytest.raises(ValueError, match=r"'sync' \(also 'cross_iteration' for 'cbn'\)"):
        distnorm.convert_model(_nn.BatchNorm2d(3), mode="nope")
    with pytest.raises(ValueError, match="already registered"):
        distnorm.register_variant("cross_iteration")(type("Other", (), {}))


def test_packed_sums_layout_has_one_home():
    """[m, Σx, Σx²] is laid out by distnorm._packing alone: no index arithmetic on it
    elsewhere."""
    patterns = ("1 + channels", "2 * channels + 1", "2 * num_features + 1", "[1:1 +",
                "sums[0]")
    for name, path in MODULES.items():
        if name != f"{PACKAGE}._packing":
            text = path.read_text(encoding="utf-8")
            assert not [p for p in patterns if p in text], name
    sums = distnorm.stats.moment_sums(torch.arange(12.0).view(2, 3, 2))
    count, sum_x, sum_sq = distnorm._packing.unpack_sums(sums)
    assert sums.numel() == distnorm._packing.packed_size(3) and float(count) == 4
    assert torch.equal(sum_x, torch.tensor([14.0, 22.0, 30.0], dtype=torch.float64))
    assert torch.equal(sum_sq, torch.tensor([86.0, 158.0, 262.0], dtype=torch.float64))
    head, extra = distnorm._packing.split_packed(torch.cat([sums, torch.ones(5)]), 3)
    assert torch.equal(head, sums) and extra.numel() == 5


# -- floors: process groups < launching < testing ----------------------------------------

def _package_graph() -> Dict[str, Set[str]]:
    """GRAPH with every module folded into its subpackage of distnorm (``distnorm.launch``,
    ``distnorm.distributed``, ...; top-level modules stay themselves)."""
    def fold(name: str) -> str:
        parts = name.split(".")
        sub = ".".join(parts[:2])
        return sub if sub in MODULES and MODULES[sub].name == "__init__.py" else name

    folded: Dict[str, Set[str]] = {}
    for name, deps in GRAPH.items():
        folded.setdefault(fold(name), set()).update(fold(d) for d in deps)
    for name, deps in folded.items():
        deps.discard(name)
    return folded


def test_process_groups_never_import_the_launchers():
    """Launching depends on distnorm.distributed, never the reverse (a circle
    distnorm.distributed <-> distnorm.launch.env existed through init_from_env and
    import_before_init; the old names are now warning aliases in __getattr__)."""
    for name, deps in GRAPH.items():
        if name.startswith(f"{PACKAGE}.distributed"):
            above = sorted(d for d in deps if d.startswith(f"{PACKAGE}.launch"))
            assert not above, f"{name} imports {above}"
    packages = _package_graph()
    assert f"{PACKAGE}.distributed" in packages[f"{PACKAGE}.launch"]
    assert f"{PACKAGE}.launch" not in packages[f"{PACKAGE}.distributed"]


def test_no_circle_between_subpackages():
    """No circle in the graph of subpackages either (a module of one package importing
    another that imports it back is a circle in the design, even without a module
    circle)."""
    graph = _package_graph()
    state: Dict[str, int] = {}

    def visit(node: str, path: List[str]) -> List[str]:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path + [node, dep]
            if dep not in state:
                found = visit(dep, path + [node])
                if found:
                    return found
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            assert not cycle, "subpackage circle: " + " -> ".join(cycle)


def test_the_product_does_not_import_its_test_harness():
    """distnorm.testing sits on top: nothing else in distnorm imports it."""
    for name, deps in GRAPH.items():
        if not name.startswith(f"{PACKAGE}.testing"):
            assert not any(d.startswith(f"{PACKAGE}.testing") for d in deps), name


def test_moved_launch_names_are_warning_aliases():
    import importlib
    import warnings as _warnings

    import distnorm.launch.env
    import distnorm.launch.local

    old = importlib.import_module("distnorm.distributed.launch")
    for name, home in (("init_from_env", distnorm.launch.env), ("free_port", distnorm.launch.local),
                       ("run_local", distnorm.launch.local), ("RendezvousError", distnorm.launch.env),
                       ("import_before_init", distnorm.distributed)):
        with pytest.warns(FutureWarning, match=f"import {name} from {home.__name__}"):
            assert getattr(old, name) is getattr(home, name)
    with pytest.warns(FutureWarning, match="import it from distnorm.launch.env"):
        assert distnorm.distributed.init_from_env is distnorm.launch.env.init_from_env
    with _warnings.catch_warnings():
        _warnings.simplefilter("error")
        assert distnorm.distributed.group_by is not None  # current names do not warn
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        old.nope  # noqa: B018
def test_fault_matrix_scaffolding_stays_out_of_the_package():
    """The fault matrix's worlds and scenarios are test and benchmark scaffolding: they
    live in benchmarks/ (fault_worlds.py, fault_scenarios.py), not in distnorm."""
    assert not [name for name in MODULES if "fault" in name.rsplit(".", 1)[-1]]
    benchmarks = ROOT.parent / "benchmarks"
    if benchmarks.is_dir():  # a checkout (installed, they are distnorm._bench's)
        assert (benchmarks / "fault_worlds.py").is_file()
        assert (benchmarks / "fault_scenarios.py").is_file()
