"""The house's plan, checked on every import of every module (the contract an import linter would
hold): floors that import only downward, the service's wings with arrows one way, and HTTP only
in the api wing.

Floors, top to bottom: the command line (`byorl/cli.py`, `byorl/demo_gallery.py`); the service;
training and the index; the model directory and atomic files. Inside the service: the entry
points (`main.py`, `worker.py`) over `api/`, which may use every wing; `jobs/` uses storage and
serving; `serving/` uses storage (the served models come from the model registry there);
`storage/` uses only the base modules beside it (settings, exceptions, names, metrics), which
use no wing.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"byorl": "byorl", "training": "byorl.training", "index": "byorl.index",
           "service": "byorl.service"}
WEB = ("fastapi", "starlette", "uvicorn")


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


def imports(path: Path) -> set[str]:
    """The modules a file imports, anywhere in it (function-level imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def layer(module: str) -> str:
    """The floor or wing a module belongs to."""
    parts = module.split(".")
    if parts[:2] == ["byorl", "service"] and len(parts) > 2:
        wing = parts[2]
        return f"service.{wing}" if wing in ("api", "serving", "storage", "jobs") else (
            "service.entry" if wing in ("main", "worker") else "service.base")
    if module in ("byorl.cli", "byorl.demo_gallery"):
        return "cli"
    if parts[:2] in (["byorl", "training"], ["byorl", "index"]):
        return parts[1]
    return "ground"  # byorl, byorl.files, byorl.model_dir


# What each floor or wing may import (besides itself).
ALLOWED = {
    "ground": set(),  # byorl/__init__.py names training's entry points as strings (lazy)
    "index": {"ground"},
    "training": {"ground", "index"},
    "service.base": {"ground"},
    "service.storage": {"ground", "index", "service.base"},
    "service.serving": {"ground", "service.base", "service.storage"},
    "service.jobs": {"ground", "index", "training", "service.base", "service.storage",
                     "service.serving"},
    "service.api": {"ground", "index", "service.base", "service.storage", "service.serving",
                    "service.jobs"},
    "service.entry": {"service.base", "service.api", "service.jobs"},
    "cli": {"ground", "index", "training", "service.base", "service.storage",
            "service.serving", "service.jobs", "service.api", "service.entry"},
}
ALL = modules()


@pytest.mark.parametrize("module", sorted(ALL))
def test_imports_run_down_the_floors_and_one_way_between_wings(module):
    own = layer(module)
    wrong = sorted(f"{m} ({layer(m)})" for m in imports(ALL[module])
                   if m.startswith("byorl") and layer(m) != own and layer(m) not in ALLOWED[own])
    assert wrong == [], f"{module} ({own}) imports upward or across: {wrong}"


@pytest.mark.parametrize("module", sorted(ALL))
def test_only_the_api_wing_speaks_http(module):
    web = sorted(m for m in imports(ALL[module]) if m.split(".")[0] in WEB)
    assert layer(module) == "service.api" or web == [], f"{module} imports {web}"


def test_the_contract_sees_every_wing():
    """A wing renamed or moved would make the checks above vacuous."""
    assert {layer(m) for m in ALL} == set(ALLOWED)
