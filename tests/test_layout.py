"""The shape of the code: the two wings never import each other, and library internals stay fenced.

Read from the source (``ast``), so every import counts, also the ones inside
functions; plus fresh interpreters for what importing a module really loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "towerws"
WEBSOCKET, AMQP = "towerws.websocket", "towerws.amqp"
#: the adapters: the only modules allowed to touch a library's private names
ADAPTERS = {"towerws.twisted_internals", "towerws.websocket.autobahn_internals", "towerws.amqp.txamqp_internals",
            "towerws.pika_internals"}
#: the modules that wire or re-export both sides
ABOVE_THE_WINGS = {"towerws.app", "towerws.publish"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(tree: ast.AST) -> set[str]:
    """Every module an ``import`` / ``from ... import`` names, wherever it stands."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            # "from towerws.amqp import txamqp_internals" imports a module too
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_package_is_what_this_test_reads() -> None:
    assert {"towerws.hub", "towerws.bus", "towerws.websocket.protocol", "towerws.amqp.service"} <= MODULES.keys()


@pytest.mark.parametrize("wing, other, library", [(WEBSOCKET, AMQP, "txamqp"), (AMQP, WEBSOCKET, "autobahn")])
def test_a_wing_never_imports_the_other(wing: str, other: str, library: str) -> None:
    crossings = [
        f"{name} imports {imported}"
        for name, tree in MODULES.items()
        if _in(name, wing)
        for imported in sorted(imports_of(tree))
        if _in(imported, other) or _in(imported, library)
    ]
    assert not crossings, "the wings must meet only below both (towerws.bus, towerws.messages, ...): " + "; ".join(crossings)


def test_below_the_wings_nothing_imports_a_wing() -> None:
    crossings = [
        f"{name} imports {imported}"
        for name, tree in MODULES.items()
        if not (_in(name, WEBSOCKET) or _in(name, AMQP)) and name not in ABOVE_THE_WINGS
        for imported in sorted(imports_of(tree))
        if _in(imported, WEBSOCKET) or _in(imported, AMQP)
    ]
    assert not crossings, "shared modules sit below both wings: " + "; ".join(crossings)


def _defined_names() -> set[str]:
    names: set[str] = set()
    for tree in MODULES.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return names


def test_private_names_of_libraries_only_in_the_adapters() -> None:
    """A ``_name`` towerws reads but never defines belongs to a library: only an adapter may touch it."""
    ours = _defined_names()
    reaches = []
    for name, tree in MODULES.items():
        if name in ADAPTERS:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if node.attr not in ours:
                    reaches.append(f"{name}:{node.lineno} {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom) and node.module and not _in(node.module, "towerws"):
                reaches += [f"{name}:{node.lineno} imports {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_")]
    assert not reaches, "move these behind the library's *_internals.py adapter: " + "; ".join(reaches)


def _loaded_after(statement: str) -> set[str]:
    """Top-level packages in ``sys.modules`` after running ``statement`` in a fresh interpreter."""
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
    return set(out.stdout.split())


HEAVY = {"OpenSSL", "txamqp", "treq", "cryptography", "autobahn", "pika"}


@pytest.mark.parametrize("statement, allowed", [
    # Settings is a leaf: reading options loads no TLS, AMQP or HTTP client.
    ("import towerws.config", set()),
    # twistd scans the plugin at every start, for every plugin it has.
    ("import twisted.plugins.towerws_plugin", set()),
    # broker-less mode never loads txAMQP (Autobahn brings Twisted's TLS support along).
    ("import towerws.websocket.web", {"autobahn", "OpenSSL", "cryptography"}),
    # the Twisted publisher does not drag in the websocket server.
    ("import towerws.publish", {"txamqp", "OpenSSL", "cryptography"}),
    # the synchronous emitter is pika only.
    ("import towerws.emit", {"pika"}),
])
def test_what_importing_loads(statement: str, allowed: set[str]) -> None:
    loaded = _loaded_after(statement) & HEAVY
    assert loaded <= allowed, f"{statement} loads {sorted(loaded - allowed)}"
