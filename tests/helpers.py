"""The tests' helpers: real fedsync processes, each bounded in time (only tests marked `processes` may start them:
`make test-fast` leaves those out), and files written as a worker or a forger would write them."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pyrage
import pytest
import torch
from safetensors.torch import load as st_load

from fedsync import __version__
from fedsync.storage.keys import (
    Identity,
    coordinator_key_path,
    load_identity,
    load_sealing_identity,
    sealing_key_path,
    worker_key_path,
)
from fedsync.storage.local import atomic_write
from fedsync.storage.manifest import read_manifest
from fedsync.storage.markers import FORMAT_VERSION, Assignment, FileRef, UpdateMarker, WorkerInfo, to_dict
from fedsync.storage.sealing import SCHEME, SealingIdentity, seal, sealed_head
from fedsync.storage.share import Share
from fedsync.storage.signing import update_message
from fedsync.storage.yamlfile import dump_yaml, parse_yaml
from fedsync.tensors.files import save_state

FEDSYNC = [sys.executable, "-m", "fedsync"]
PROCESSES_ALLOWED = True  # set per test by conftest.py: whether the running test is marked `processes`


def _may_start_processes() -> None:
    """A test that starts fedsync processes must say so (@pytest.mark.processes): the fast lane relies on it."""
    if not PROCESSES_ALLOWED:
        pytest.fail("this test starts fedsync processes but is not marked @pytest.mark.processes (the fast lane, "
                    "`make test-fast`, must leave it out)")


def read_yaml(path: Path) -> Any:
    """A YAML file of a local share, by path (fedsync itself reads through Share.read_yaml)."""
    return parse_yaml(path.read_bytes())


def write_yaml(path: Path, obj: Any) -> None:
    """Write a YAML file whole into a local share, as a forger or a test's fake worker would."""
    atomic_write(path, dump_yaml(obj))
# Keys of every process the tests start (and of the tests acting as workers) live here, never in ~/.config. Each
# pytest-xdist worker process gets its own folder (they inherit the controller's environment): two tests side by
# side may start workers of the same name, and one key file for both would be a race.
if "PYTEST_XDIST_WORKER" in os.environ or "FEDSYNC_KEY_DIR" not in os.environ:
    os.environ["FEDSYNC_KEY_DIR"] = tempfile.mkdtemp(prefix="fedsync-test-keys-")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def worker_identity(name: str) -> Identity:
    """The key a worker process named `name` would use on this machine (created on first use)."""
    return load_identity(worker_key_path(name))[0]


def coordinator_identity() -> Identity:
    """The key a coordinator process started by the tests signs with."""
    return load_identity(coordinator_key_path())[0]


def signed(marker: UpdateMarker, run_id: str, key: Identity | None = None) -> dict[str, Any]:
    """The marker as its worker writes it: signed with that worker's key (or `key`, as a forger would)."""
    ident = key or worker_identity(marker.worker)
    return to_dict(replace(marker, signature=ident.sign(update_message(run_id, marker))))


def start(*args: str, fault: str | None = None, env: dict[str, str] | None = None,
          wrap: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """A real fedsync process; `fault` names a crash point (fedsync/base/faults.py) where it kills itself; `env` adds
    variables (FEDSYNC_DEVICE_FACTS, FEDSYNC_SLOWDOWN); `wrap` is a command that runs it (setpriv)."""
    _may_start_processes()
    extra = {**(env or {}), **({"FEDSYNC_FAULT": fault} if fault else {})}
    return subprocess.Popen([*wrap, *FEDSYNC, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**ENV, **extra})


def finish(proc: subprocess.Popen[str], timeout: float) -> str:
    """Wait for a process; on timeout kill it and fail with its output."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        args = list(map(str, proc.args))
        pytest.fail(f"`{' '.join(args[args.index('fedsync') + 1:])}` did not finish in {timeout} s:\n{out}")
    return out


def require(tool: str, install: str) -> None:
    """Skip a test whose real software is absent, saying how to install it; in CI (CI=true) fail instead."""
    import shutil

    if shutil.which(tool) is None:
        missing(f"needs {tool}: {install} (.ci/run installs it)")


def missing(message: str) -> None:
    """Skip a test that cannot run here, saying why; in CI (CI=true), where everything is there, fail instead."""
    if os.environ.get("CI"):
        pytest.fail(message + "; CI must run this test")
    pytest.skip(message)


def run(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    _may_start_processes()
    return subprocess.run(FEDSYNC + list(args), capture_output=True, text=True, env={**ENV, **(env or {})},
                          timeout=timeout)


def register_worker(share: Share, name: str, beat: int = 1, key: Identity | None = None) -> None:
    """Write a worker's registration (a heartbeat when repeated) with its public key, as a worker process would."""
    share.store.write(share.worker_file(name), dump_yaml(to_dict(WorkerInfo(
        format=FORMAT_VERSION, name=name, host="test-host", fedsync=__version__, torch=str(torch.__version__),
        device="cpu", device_name="CPU", cuda_capability=None, state="idle", round=None, heartbeat=beat,
        public_key=(key or worker_identity(name)).public))))


def wait_until(check: Callable[[], object], timeout: float, what: str) -> None:
    """Poll `check` every 20 ms; fail the test after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def coordinator_opener() -> SealingIdentity:
    """The key that opens updates sealed to a coordinator started by the tests (beside its signing key)."""
    return load_sealing_identity(sealing_key_path(coordinator_key_path()))[0]


def submit_update(share: Share, a: Assignment, worker: str, update: dict[str, torch.Tensor],
                  samples: int = 100, steps: int = 1) -> FileRef:
    """Write an update and then its marker for round `a.round`, as a worker process does: sealed to the run's
    recipient when its fedsync.yaml keeps updates confidential."""
    manifest = read_manifest(share) if share.exists(share.manifest) else None
    recipient = manifest.recipient if manifest and manifest.config.get("confidential_updates") else None
    ref = save_state(share.store.write, share.update_tensors(a.round, worker, sealed=recipient is not None), update,
                     seal=partial(seal, recipient=recipient) if recipient else None)
    share.store.write(share.update_marker(a.round, worker), dump_yaml(signed(UpdateMarker(
        format=FORMAT_VERSION, round=a.round, worker=worker, base=a.model.blake3, tensors=ref, samples=samples,
        steps=steps, train_loss=1.0, seconds=1.0, device="cpu", encryption=SCHEME if recipient else "none"),
        a.run_id)))
    return ref


@contextmanager
def killed_on_error(*procs: subprocess.Popen[str]) -> Iterator[None]:
    """If the block fails, kill these processes, so the test fails at once and leaves none behind."""
    try:
        yield
    except BaseException:
        for p in procs:
            p.kill()
        raise


class StackedSlices:
    """The aggregation rules' Slices over updates held in memory (the intake's own reads files from the share)."""

    def __init__(self, updates: list[dict[str, torch.Tensor]]) -> None:
        self.updates = updates

    def count(self) -> int:
        return len(self.updates)

    def read(self, tensor: str, start: int, length: int) -> torch.Tensor:
        return torch.stack([u[tensor].reshape(-1)[start:start + length] for u in self.updates])

    def reading(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()


def assert_sealed(share: Share, r: int, workers: list[str]) -> None:
    """Round `r`'s updates in `share` (any copy of it) are ciphertext: each `.safetensors.age` file fails to load as
    safetensors, there is no plain one, and the coordinator's key opens each to the round's tensors."""
    for w in workers:
        assert not share.exists(share.update_tensors(r, w)), f"{w}'s round-{r} update is in plain"
        data = share.store.read(share.update_tensors(r, w, sealed=True), 1 << 30)
        assert data.startswith(b"age-encryption.org/v1\n")
        marker = share.read_record(UpdateMarker, share.update_marker(r, w))
        assert marker.sealed_head == sealed_head(data)  # signed: the coordinator hashes only these bytes
        with pytest.raises(Exception):  # noqa: B017 - any error: the bytes are not a safetensors file
            st_load(data)
        plain = opened_update(share, r, w)  # a second age implementation opens it with the coordinator's key
        assert set(plain) == set(st_load(share.store.read(share.global_model(r), 1 << 30)))


def opened_update(share: Share, r: int, worker: str) -> dict[str, torch.Tensor]:
    """A sealed update as the coordinator's key opens it, through rage (pyrage), not fedsync's own reader."""
    data = share.store.read(share.update_tensors(r, worker, sealed=True), 1 << 30)
    identity = pyrage.x25519.Identity.from_str(coordinator_opener().text().splitlines()[-1])
    return st_load(pyrage.decrypt(data, [identity]))
