"""A task from outside fedsync: the example package in examples/wine_task, really installed (pip, into a folder
of its own), found by its entry point or by reference, run end to end by real processes; a machine with another
version of it refuses before it trains."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedsync.base.errors import ConfigError
from fedsync.learning.tasks import DataOptions, get_task
from fedsync.storage.markers import FinalMarker, Manifest
from fedsync.storage.share import Share

from .helpers import finish, killed_on_error, run, start, wait_until

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "wine_task"
CONFIG = str(EXAMPLE / "wine.yaml")


def install(source: Path, target: Path) -> dict[str, str]:
    """pip-install a copy of the package into `target` (the checkout stays clean); the environment that finds it."""
    copy = target.parent / f"{target.name}-src"
    shutil.copytree(source, copy)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(copy)], check=True, timeout=120)
    return {"PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return install(EXAMPLE, tmp_path_factory.mktemp("wine") / "site")


@pytest.mark.processes
def test_the_example_task_trains_from_its_installed_package_and_another_version_is_refused(
        installed: dict[str, str], share: Path, tmp_path: Path) -> None:
    coord = start("coordinator", "--share", str(share), "--rounds", "3", "--config", CONFIG, "--set",
                  "min_workers=2", env=installed)
    with killed_on_error(coord):
        wait_until(lambda: (share / "fedsync.yaml").exists(), 60, "the run to start")
        workers = [start("worker", "--share", str(share), "--name", f"w{i}", "--device", "cpu", "--wait-for-run",
                         "60", env=installed) for i in (1, 2)]
        out = finish(coord, timeout=120)
        outs = [finish(w, timeout=30) for w in workers]
    assert coord.returncode == 0 and all(w.returncode == 0 for w in workers), out + "".join(outs)
    s = Share(share)
    manifest = s.read_record(Manifest, s.manifest)
    assert (manifest.task.name, manifest.task.version) == ("wine", "0.1.0")
    assert s.read_record(FinalMarker, s.final_marker).test_accuracy >= 0.9, out  # README: about 0.98

    # a machine whose package is another version (a wider hidden layer) refuses before it registers or trains
    other = tmp_path / "other"
    shutil.copytree(EXAMPLE, other)
    code = (other / "fedsync_wine" / "__init__.py").read_text()
    (other / "fedsync_wine" / "__init__.py").write_text(
        code.replace('__version__ = "0.1.0"', '__version__ = "0.2.0"').replace("HIDDEN = 32", "HIDDEN = 64"))
    other_env = install(other, tmp_path / "site-0.2")
    with ThreadPoolExecutor(2) as pool:  # and a machine without the package at all
        refused, missing = pool.map(lambda env: run("worker", "--share", str(share), "--name", "w3" if env else "w4",
                                                    "--device", "cpu", env=env), [other_env, {}])
    assert refused.returncode == 3, refused.stderr
    assert "task 'wine' on this machine differs from run" in refused.stderr and "'0.2.0'" in refused.stderr
    assert not (share / "workers" / "w3.yaml").exists()
    assert missing.returncode == 3 and "task 'wine' is not one of causal_lm, cifar10, digits" in missing.stderr


@pytest.mark.processes
def test_a_task_by_reference_and_the_errors_that_name_what_is_wrong(installed: dict[str, str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(installed["PYTHONPATH"].split(os.pathsep)[0])
    task = get_task("fedsync_wine:TASK")
    assert task.version == "0.1.0" and task.model_names() == ["mlp"] and task.input_shape == (13,)
    data = task.load(None, DataOptions(seed=0, test_fraction=0.25, verify_checksums=True))
    assert (len(data.train), len(data.test)) == (134, 44)
    for name, words in [("fedsync_wine:HIDDEN", "is a int, not a fedsync"), ("fedsync_wine:NOPE", "is missing"),
                        ("no_such_package.tasks:T", "module no_such_package is not installed on this machine")]:
        with pytest.raises(ConfigError, match=words):
            get_task(name)
