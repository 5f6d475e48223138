"""The layout's rules (docs/DESIGN.md, "Layers"), read from the source so they cannot drift: which layer may
import which, and inside a layer which part may import which (the roles above their bookkeeping, one role's
bookkeeping never another's), no torch below the tensors layer, no share I/O outside the storage layer, share names
in one module, and every module folder in DESIGN.md's table."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fedsync"
LAYERS = {"base": 0, "storage": 1, "tensors": 2, "learning": 3, "aggregation": 3, "run": 4, "cli": 5}
# Inside a layer, where an order exists: a part imports only parts of a lower rank, or of its own group at its rank.
# run: the bookkeeping every role shares (run/*.py), then each role's own (run/<role>/), then the roles themselves.
ROLE_FOLDERS = ("coordinating", "working", "submitting", "inspecting")
ROLES = ("coordinator", "worker", "infer")
# aggregation: the running sums updates are streamed into (sums.py), then the maths over them (fedavg.py, the rules,
# screening, the server optimizers), then the intake that reads update files into the sums, then the screens that act
# on the intake (defence.py).
AGGREGATION_RANKS = {"fedsync/aggregation/sums.py": 0, "fedsync/aggregation/intake.py": 2,
                     "fedsync/aggregation/defence.py": 3}
TOP_LEVEL = {"coordinator": "run", "worker": "run", "infer": "run", "fedavg": "aggregation", "__main__": "cli",
             "__init__": "base"}
# Files that read what is not the share: each machine's own data and the user's own config file.
NOT_THE_SHARE = {"fedsync/learning/data.py": "datasets on this machine",
                 "fedsync/learning/imagefolder.py": "a machine's own image folder",
                 "fedsync/base/machine.py": "the kernel's account of this machine's cores and free memory",
                 "fedsync/learning/text.py": "a machine's own text (JSON lines files)",
                 "fedsync/learning/lora.py": "a machine's own copy of a base language model, and adapters exported",
                 "fedsync/run/config.py": "the user's config file",
                 "fedsync/tensors/residuals.py": "a worker's error-feedback residual, on its own disk beside its key",
                 "fedsync/learning/inputs.py": "an inference job's inputs, on the submitting machine",
                 "fedsync/run/submitting/predictions.py": "an inference job's predictions, written to the user's own "
                                                          "files",
                 "fedsync/infer.py": "the model file a user gives `fedsync infer`"}
FILE_MODULES = {"os", "shutil", "io", "gzip", "tempfile"}  # any call of theirs on a path is file I/O
PATH_METHODS = {"open", "stat", "lstat", "iterdir", "glob", "rglob", "read_bytes", "read_text", "write_bytes",
                "write_text", "exists", "is_file", "is_dir", "is_symlink", "touch", "symlink_to", "unlink", "mkdir",
                "rmdir", "rename", "replace"}
NOT_FILES = {"environ", "getpid", "kill", "cpu_count", "fspath", "getenv", "StringIO", "BytesIO", "setpriority",
             "sched_getaffinity", "sysconf"}
SHARE_FILES = ("fedsync.yaml", "coordinator.yaml", "metrics.csv", "final.safetensors", "final.yaml",
               "global.safetensors", "assignment.yaml", "summary.yaml")
SHARE_FOLDERS = ("workers", "updates")


def _modules() -> dict[str, Path]:
    return {p.relative_to(ROOT).as_posix(): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(relative: str) -> str:
    parts = relative.removesuffix(".py").split("/")[1:]  # drop "fedsync"
    return parts[0] if len(parts) > 1 else TOP_LEVEL[parts[0]]


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """Every module an import statement names, module level or inside functions."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"line {node.lineno}: relative import; fedsync imports itself by full path"
            out += [(node.lineno, node.module or "")]
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module == "fedsync"]
    return out


def _place(relative: str) -> tuple[int, str] | None:
    """A module's (rank, group) inside its layer, where the layer has an order; None where it has none."""
    parts = relative.removesuffix(".py").split("/")
    layer = _layer(relative)
    if layer == "run":
        if len(parts) == 2:
            return 2, parts[1]  # a role: fedsync/coordinator.py
        if len(parts) == 3:
            return 0, "shared"
        return 1, parts[2]
    if layer == "aggregation":
        return AGGREGATION_RANKS.get(relative, 1), "aggregation"
    return None


def _module_file(module: str) -> str | None:
    """The file a fedsync module name stands for (a package: its __init__.py), relative to the repository."""
    base = ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate.relative_to(ROOT).as_posix()
    return None


def _target_layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fedsync" or len(parts) == 1 or parts[1] in ("configs", "__version__"):
        return None
    return parts[1] if parts[1] in LAYERS else TOP_LEVEL[parts[1]]


@pytest.mark.parametrize("relative", list(_modules()))
def test_each_module_imports_only_its_own_layer_and_those_below(relative: str) -> None:
    source = _layer(relative)
    tree = ast.parse(_modules()[relative].read_text())
    for line, module in _imports(tree):
        target = _target_layer(module)
        if target is not None and target != source:
            assert LAYERS[target] < LAYERS[source], f"{relative}:{line} ({source}) imports {module} ({target})"
        if target == source and (file := _module_file(module)) is not None:
            here, there = _place(relative), _place(file)
            if here is not None and there is not None and there != here:
                assert there[0] < here[0], f"{relative}:{line} {here} imports {module} {there}: in the {source} " \
                    "layer a part imports only lower ranks (docs/DESIGN.md, the layer table)"
        if LAYERS[source] <= LAYERS["storage"]:
            assert module.split(".")[0] not in ("torch", "torchvision", "numpy") and module != "safetensors.torch", \
                f"{relative}:{line}: the {source} layer imports {module}"


def _calls(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that touch files: open(), os/shutil/io functions, and path methods on anything but a Share or Store."""
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id == "open":
            out.append((node.lineno, "open"))
        elif isinstance(f, ast.Attribute):
            receiver = ast.unparse(f.value)
            if receiver in FILE_MODULES and f.attr not in NOT_FILES:
                out.append((node.lineno, ast.unparse(f)))
            elif f.attr in PATH_METHODS and not receiver.endswith(("share", "store")):
                out.append((node.lineno, ast.unparse(f)))
    return out


@pytest.mark.parametrize("relative", [m for m in _modules() if not m.startswith("fedsync/storage/")])
def test_no_module_outside_storage_touches_files_itself(relative: str) -> None:
    found = _calls(ast.parse(_modules()[relative].read_text()))
    if relative in NOT_THE_SHARE:
        return
    assert not found, f"{relative} does file I/O itself ({found}); go through the Share / Store (docs/DESIGN.md)"


def test_the_file_check_sees_file_io() -> None:
    """The check above is not blind: the storage layer's own I/O is found by the same scan."""
    found = _calls(ast.parse((PACKAGE / "storage" / "local.py").read_text()))
    assert {"os.open", "os.scandir", "os.stat", "os.replace"} <= {name for _, name in found}


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


@pytest.mark.parametrize("relative", [m for m in _modules() if m != "fedsync/storage/names.py"])
def test_share_names_are_spelled_only_in_names_py(relative: str) -> None:
    for line, text in _strings(ast.parse(_modules()[relative].read_text())):
        spelled = [n for n in SHARE_FILES if text == n or text.endswith("/" + n)]
        spelled += [n for n in SHARE_FOLDERS if text.startswith(n + "/")]
        assert not spelled, f"{relative}:{line} spells the share name {text!r}: use fedsync/storage/names.py"


def test_the_name_check_sees_names() -> None:
    names = ast.parse((PACKAGE / "storage" / "names.py").read_text())
    assert any(text == "summary.yaml" for _, text in _strings(names))


def test_inside_a_layer_the_order_is_seen() -> None:
    """The rank check is not blind: bookkeeping that imported its role, or one role's bookkeeping another's, fails."""
    assert _place("fedsync/run/coordinating/ledger.py") == (1, "coordinating")
    assert _place("fedsync/coordinator.py") == (2, "coordinator")
    assert _place("fedsync/run/config.py") == (0, "shared")
    assert _module_file("fedsync.coordinator") == "fedsync/coordinator.py"
    assert _module_file("fedsync.run.working.serve") == "fedsync/run/working/serve.py"
    assert not _place("fedsync/coordinator.py")[0] < _place("fedsync/run/coordinating/ledger.py")[0]  # type: ignore
    assert _place("fedsync/run/working/serve.py") != _place("fedsync/run/coordinating/ledger.py")


def test_design_lists_every_module_folder() -> None:
    """docs/DESIGN.md's layer table names every folder of the package and every top-level module."""
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    folders = {p.parent.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")} - {"fedsync"}
    top = {p.relative_to(ROOT).as_posix() for p in PACKAGE.glob("*.py")} - {"fedsync/__init__.py",
                                                                           "fedsync/__main__.py"}
    missing = sorted(name for name in folders | top if f"`{name}" not in design)
    assert not missing, f"docs/DESIGN.md's layer table does not list {missing}"
