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
from fedsync.run import trust as trust_module
from fedsync.run.config import load_config
from fedsync.run.start import open_run
from fedsync.run.trust import Trust, read_trust
from fedsync.storage.keys import load_identity, pinned_coordinator
from fedsync.storage.markers import FORMAT_VERSION, Assignment, FileRef, FinalMarker, UpdateMarker, WorkerTask, parse
from fedsync.storage.reasons import Unusable
from fedsync.storage.share import Share
from fedsync.storage.signing import fingerprint, update_message, verify

from .helpers import (
    coordinator_identity,
    finish,
    killed_on_error,
    register_worker,
    run,
    start,
    wait_until,
    worker_identity,
)

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


@pytest.mark.processes
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
        wait_until(lambda: f"registers key {fp_b}, not the trusted {fp_a}" in _trust_of(share, "w1"), 60,
                   "status to show the changed key")
        ok = run("trust", "w1", "--share", str(share), "--fingerprint", fp_b)
        assert ok.returncode == 0, ok.stderr
        out = finish(coord, timeout=120)
        second = finish(w1, timeout=30)
    assert coord.returncode == 0, out + first + second
    assert f"worker w1: waits for approval of its key {fp_a}: run `fedsync trust w1 --share {share} --fingerprint " \
        f"{fp_a}`" in out, out  # a hint that can be pasted as it is
    assert f"worker w1: registers key {fp_b}, not the trusted {fp_a}" in out, out
    assert f"the coordinator trusts key {fp_a} for w1, not this worker's {fp_b}" in second, second
    final = parse(FinalMarker, s.read_yaml(s.final_marker), "final")
    assert final.round == 2 and final.test_accuracy > 0.5
    assert _trust_of(share, "w1") == "approved"


def test_an_update_counts_only_when_signed_by_the_trusted_key_for_this_round(tmp_path: Path) -> None:
    """The coordinator's check, alone: each way a marker can fail to be its worker's own, with its reason."""
    share = Share(tmp_path / "share")
    coordinator = load_identity(tmp_path / "c.pem")[0]
    run_id = open_run(share, load_config("digits"), "coordinator", coordinator).run_id
    own, forger = load_identity(tmp_path / "w1.pem")[0], load_identity(tmp_path / "x.pem")[0]
    registered = {"w1": own.public}
    trust = Trust(share, run_id, coordinator, "tofu", registered.get, lambda line: None)
    assert trust.admit("w1") and read_trust(share, run_id, coordinator.public)["w1"].state == "pinned"
    a = Assignment(format=FORMAT_VERSION, run_id=run_id, round=2, rounds=3, model=FileRef("global.safetensors",
                   "ab" * 32, 10), num_shards=1, time_budget_s=5.0, workers={"w1": WorkerTask(0, 1)},
                   shards=FileRef("shards/001.safetensors", "cd" * 32, 10))

    def reason(m: UpdateMarker, key=own) -> str | None:
        signed_m = replace(m, signature=key.sign(update_message(run_id, m)) if key else None)
        try:
            trust.check_update(a, "w1", signed_m, "w1.yaml")
        except Unusable as e:
            assert e.reason.waits  # decided before the marker is the worker's own: it waits for the real one
            return e.reason.value
        return None

    assert reason(MARKER) is None
    assert reason(MARKER, forger) == "bad_signature"
    assert reason(MARKER, None) == "unsigned"
    assert reason(replace(MARKER, round=1)) == "wrong_round"  # a replay of an earlier round, as signed
    assert reason(replace(MARKER, worker="w2"), forger) == "wrong_worker"
    registered["w1"] = forger.public  # w1 comes back with another key and signs with it
    assert reason(MARKER, forger) == "untrusted_key"
    assert not trust.admit("w1")  # and gets no work until a person approves the new key
    registered["w1"] = own.public
    trust_module.revoke_worker(share, "w1", tmp_path / "c.pem")  # `fedsync trust w1 --revoke`
    assert trust.refresh() and reason(MARKER) == "untrusted_key"  # its own key, signing as before: no longer counts
    assert not trust.admit("w1")


def test_workers_seen_together_are_pinned_in_one_amendment_of_trust_yaml(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Pinning one worker at a time rewrote trust.yaml (which grows with the workers) once per worker: quadratic in
    the workers (docs/BENCHMARKS.md, benchmarks/scale_workers.py). Those seen in one scan are pinned together."""
    share = Share(tmp_path / "share")
    coordinator = load_identity(tmp_path / "c.pem")[0]
    run_id = open_run(share, load_config("digits"), "coordinator", coordinator).run_id
    keys = {f"w{i}": load_identity(tmp_path / f"w{i}.pem")[0].public for i in range(5)}
    keys["nokey"] = None  # type: ignore[assignment]  # registered without a key: no work, nothing pinned
    amendments: list[int] = []
    real = trust_module.amend_trust
    monkeypatch.setattr(trust_module, "amend_trust", lambda *a: amendments.append(1) or real(*a))
    said: list[str] = []
    trust = Trust(share, run_id, coordinator, "tofu", keys.get, said.append)
    assert trust.admit_all(sorted(keys)) == sorted(k for k in keys if k != "nokey")
    assert len(amendments) == 1
    entries = read_trust(share, run_id, coordinator.public)
    assert {n: e.key for n, e in entries.items()} == {n: k for n, k in keys.items() if k}
    assert trust.admit_all(sorted(keys)) and len(amendments) == 1  # known now: nothing written again
    assert sum("pinned its key" in line for line in said) == 5


@pytest.mark.processes
def test_a_revoked_worker_gets_no_work_and_its_updates_are_rejected_until_approved_again(share: Path) -> None:
    s = Share(share)
    manifest = open_run(s, load_config("digits"), "coordinator", coordinator_identity())
    register_worker(s, "w1")
    fp = worker_identity("w1").fingerprint
    both = run("trust", "w1", "--share", str(share), "--revoke", "--fingerprint", fp)
    assert both.returncode == 2 and "give one of the two" in both.stderr, both.stderr
    revoked = run("trust", "w1", "--share", str(share), "--revoke")
    assert revoked.returncode == 0 and f"revoked w1: key {fp} gets no work" in revoked.stdout, revoked.stderr
    entries = read_trust(s, manifest.run_id, coordinator_identity().public)
    assert (entries["w1"].key, entries["w1"].state) == (worker_identity("w1").public, "revoked")
    said: list[str] = []
    trust = Trust(s, manifest.run_id, coordinator_identity(), "tofu", lambda n: worker_identity(n).public, said.append)
    assert trust.admit_all(["w1"]) == [] and trust.admit_all(["w1"]) == []  # never pinned again under tofu
    assert said == [f"worker w1: its key {fp} was revoked (`fedsync trust w1 --revoke`): no work, and its updates do "
                    f"not count; `fedsync trust w1 --share {share} --fingerprint {fp}` trusts its registered key "
                    "again"], said  # said once
    status = run("status", "--share", str(share))
    assert f"its key {fp} was revoked" in status.stdout, status.stdout
    again = run("trust", "w1", "--share", str(share), "--fingerprint", fp)
    assert again.returncode == 0, again.stderr
    assert read_trust(s, manifest.run_id, coordinator_identity().public)["w1"].state == "approved"
    trust.refresh()
    assert trust.admit_all(["w1"]) == ["w1"]
