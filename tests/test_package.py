"""The installed layout: one top-level package, `byorl`, whose subpackages are the repository's
`training/`, `index/` and `service/` folders (pyproject's package-dir), and its entry points."""

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("training", "index", "service")


def test_the_wheel_holds_only_the_byorl_package(tmp_path):
    src = tmp_path / "src"  # a copy: building in the tree would leave build/ behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("byorl", *FOLDERS):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path / "dist"), str(src)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("byorl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"byorl"}
    for folder in FOLDERS:  # every module of each folder, under byorl/
        for path in (ROOT / folder).rglob("*.py"):
            assert f"byorl/{path.relative_to(ROOT).as_posix()}" in names
    assert "byorl/service/api/static/demo.html" in names
    scripts = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "byorl = byorl.cli:run" in zipfile.ZipFile(wheel).read(scripts).decode()
    # Every module imports from the wheel alone: a subpackage missing from pyproject's list
    # would fail here, whatever the editable install of the checkout holds.
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = """
import importlib, pkgutil, sys
import byorl
site = sys.argv[1]
loaded = []
for m in pkgutil.walk_packages(byorl.__path__, "byorl."):
    if m.name != "byorl.service.worker":  # the Celery app: needs a broker at import
        loaded.append(importlib.import_module(m.name))
outside = [m.__name__ for m in [byorl, *loaded] if not m.__file__.startswith(site)]
print(len(loaded), outside)
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], cwd=tmp_path,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert out.returncode == 0, out.stderr[-3000:]
    count, outside = out.stdout.split(" ", 1)
    expected = sum(1 for n in names if n.endswith(".py")) - 1  # all but byorl/__init__.py
    assert int(count) == expected - 1 and outside.strip() == "[]"  # (less the worker)


def test_import_byorl_exposes_the_entry_points_without_loading_torch():
    code = """
import json, sys
import byorl
light = not {"torch", "onnxruntime", "faiss"} & set(sys.modules)
names = {n: getattr(byorl, n).__module__ for n in byorl.__all__}
print(json.dumps({"light": light, "names": names}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["light"]  # `import byorl` alone loads no heavy library
    assert got["names"] == {
        "read_card": "byorl.model_dir", "load_onnx_session": "byorl.model_dir",
        "embed": "byorl.model_dir", "TrainConfig": "byorl.training.config",
        "train": "byorl.training.train", "evaluate_checkpoint": "byorl.training.evaluate",
        "Client": "byorl.client", "AsyncClient": "byorl.client"}


def test_every_module_loads_once_under_its_byorl_name():
    """Importing every module of the package leaves no module of the folders under a second,
    top-level name (`training.x` beside `byorl.training.x` would be two copies of one file)."""
    code = """
import importlib, pkgutil, sys
import byorl.index, byorl.service, byorl.training
for pkg in (byorl.index, byorl.service, byorl.training):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if m.name != "byorl.service.worker":  # the Celery app: connects at import
            importlib.import_module(m.name)
print(sorted(n for n in sys.modules if n.split(".")[0] in ("training", "index", "service")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_file_imports_the_folders_by_their_bare_names():
    """Every Python file of the repository imports `byorl.<folder>`, never `<folder>` itself."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        if {".venv", ".cache", "build", "mutants"} & set(path.relative_to(ROOT).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                          if n and n.split(".")[0] in FOLDERS]
    assert offenders == []


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}


def test_route_modules_import_no_other_route_module_and_deps_only_provides():
    """The request path goes one way: handlers import deps, schemas and the service's objects,
    never each other; deps.py holds dependencies (functions and their Annotated aliases)."""
    for path in (ROOT / "service" / "api" / "routes").glob("*.py"):
        assert not {m for m in imported_modules(path) if m.startswith("byorl.service.api.routes")}
    deps = ast.parse((ROOT / "service" / "api" / "deps.py").read_text())
    kinds = {type(node).__name__ for node in deps.body
             if not isinstance(node, ast.Import | ast.ImportFrom | ast.Expr)}
    assert kinds <= {"AsyncFunctionDef", "FunctionDef", "Assign"}  # no class, no domain object
