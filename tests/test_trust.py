"""Keys and trust: key files, what a signature covers, pinning, and a real run under `trust: explicit` where a
person approves a worker, the worker comes back with a new key, and is approved again."""

from __future__ import annotations

import json
import os
import signal
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from fedsync.base.errors import TrustError
from fedsync.storage.keys import load_identity, pinned_coordinator
from fedsync.storage.markers import FORMAT_VERSION, FileRef, FinalMarker, UpdateMarker, parse
from fedsync.storage.share import Share
from fedsync.storage.signing import fingerprint, update_message, verify

from .conftest import finish, killed_on_error, run, start, wait_until

MARKER = UpdateMarker(format=FORMAT_VERSION, round=2, worker="w1", base="ab" * 32,
                      tensors=FileRef("w1.safetensors", "cd" * 32, 100), samples=10, steps=3, train_loss=0.5,
                      seconds=1.0, device="cpu")


def test_a_key_is_created_once_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "worker-w1.pem"
    first, created = load_identity(path)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again, created = load_identity(path)
    assert not created and again.public == first.public and again.fingerprint == fingerprint(first.public)
    path.chmod(0o644)
    with pytest.raises(TrustError, match="chmod 600"):
        load_identity(path)
    with pytest.raises(TrustError, match="no key"):
        load_identity(tmp_path / "absent.pem", create=False)


@pytest.mark.parametrize("field,value", [("round", 3), ("worker", "w2"), ("base", "ef" * 32), ("samples", 11),
                                         ("steps", 4), ("tensors", FileRef("w1.safetensors", "00" * 32, 100))])
def test_the_signature_covers_every_field_that_decides_something(tmp_path: Path, field: str, value: object) -> None:
    key, _ = load_identity(tmp_path / "k.pem")
    signature = key.sign(update_message("run-1", MARKER))
    assert verify(key.public, update_message("run-1", MARKER), signature)
    assert not verify(key.public, update_message("run-1", replace(MARKER, **{field: value})), signature)
    assert not verify(key.public, update_message("run-2", MARKER), signature)  # another run: a replay
    assert verify(key.public, update_message("run-1", replace(MARKER, train_loss=9.0)), signature)  # decides nothing
    other, _ = load_identity(tmp_path / "other.pem")
    assert not verify(other.public, update_message("run-1", MARKER), signature)
    assert not verify(key.public, update_message("run-1", MARKER), None)
    assert not verify(key.public, update_message("run-1", MARKER), "ed25519:bm90IGEgc2lnbmF0dXJl")


def test_a_worker_pins_the_coordinator_key_and_refuses_another(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FEDSYNC_KEY_DIR", str(tmp_path))
    a, _ = load_identity(tmp_path / "a.pem")
    b, _ = load_identity(tmp_path / "b.pem")
    assert pinned_coordinator("run-1", a.public, None) == (a.public, True)
    assert pinned_coordinator("run-1", a.public, None) == (a.public, False)
    with pytest.raises(TrustError, match="someone rewrote fedsync.yaml"):
        pinned_coordinator("run-1", b.public, None)
    assert pinned_coordinator("run-2", b.public, b.public) == (b.public, False)  # given: no pin needed
    with pytest.raises(TrustError, match="--coordinator-key"):
        pinned_coordinator("run-2", a.public, b.public)


def _trust_of(share: Path, name: str) -> str:
    """What `fedsync status` says of the worker's key ('' before the run or the worker is there)."""
    out = run("status", "--share", str(share), "--json")
    workers = json.loads(out.stdout)["workers"] if out.returncode == 0 else []
    return next((w["trust"] for w in workers if w["name"] == name), "")


def test_explicit_trust_approval_and_a_worker_that_comes_back_with_a_new_key(share: Path, tmp_path: Path) -> None:
    """trust: explicit. w1 gets no work until approved (a wrong fingerprint approves nothing); after round 1 it
    comes back with a new key, is told so, gets no work, and is approved again; the run finishes."""
    s = Share(share)
    key_a, key_b = tmp_path / "a.pem", tmp_path / "b.pem"
    fp_a, fp_b = load_identity(key_a)[0].fingerprint, load_identity(key_b)[0].fingerprint
    coord = start("coordinator", "--share", str(share), "--rounds", "2", "--set", "trust=explicit",
                  "--set", "round_timeout=60")
    w1 = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--key", str(key_a),
               "--wait-for-run", "60")
    with killed_on_error(coord, w1):
        wait_until(lambda: "waits for approval" in _trust_of(share, "w1"), 60, "w1 to wait for approval")
        wrong = run("trust", "w1", "--share", str(share), "--fingerprint", fp_b)
        assert wrong.returncode == 10 and "nothing approved" in wrong.stderr, wrong.stderr
        assert not s.exists(s.assignment(1))
        ok = run("trust", "w1", "--share", str(share), "--fingerprint", fp_a)
        assert ok.returncode == 0 and fp_a in ok.stdout, ok.stderr
        wait_until(lambda: s.exists(s.summary(1)), 60, "round 1 to close")
        os.kill(w1.pid, signal.SIGKILL)  # the machine is reinstalled ...
        first = finish(w1, timeout=30)
        w1 = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--key", str(key_b),
                   "--wait-for-run", "60")  # ... and comes back with a new key
        wait_until(lambda: "key changed" in _trust_of(share, "w1"), 60, "status to show the changed key")
        ok = run("trust", "w1", "--share", str(share), "--fingerprint", fp_b)
        assert ok.returncode == 0, ok.stderr
        out = finish(coord, timeout=120)
        second = finish(w1, timeout=30)
    assert coord.returncode == 0, out + first + second
    assert "worker w1 waits for approval" in out and "worker w1 its key changed" in out, out
    assert f"the coordinator trusts key {fp_a} for w1, not this worker's {fp_b}" in second, second
    final = parse(FinalMarker, s.read_yaml(s.final_marker), "final")
    assert final.round == 2 and final.test_accuracy > 0.5
    assert _trust_of(share, "w1") == "approved"
