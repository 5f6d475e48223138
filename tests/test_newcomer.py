"""What a new user meets, through real processes: a share that is not there is refused by every command and left
uncreated; verify is quiet after a run is extended twice and loud at real damage; malformed keys and wrong names
are one-line errors with the right exit status; and wherever a person waits, a line says what for and what ends
the wait (approval, more workers, a coordinator that stopped)."""

from __future__ import annotations

import base64
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedsync.run.config import load_config
from fedsync.run.start import open_run
from fedsync.storage.keys import load_identity
from fedsync.storage.markers import CoordinatorLease
from fedsync.storage.share import Share

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

pytestmark = pytest.mark.processes
GONE = "does not exist: mount or sync it first, or fix --share"


def _lease(share: Path) -> CoordinatorLease | None:
    s = Share(share)
    return s.read_record(CoordinatorLease, s.lease) if s.exists(s.lease) else None


def _state(share: Path) -> str:
    lease = _lease(share)
    return lease.state if lease is not None else ""


def _note(share: Path) -> str:
    """What the coordinator's lease says it is doing (a waiting line, why it stopped); "" before it has one."""
    lease = _lease(share)
    return lease.note if lease is not None else ""


def test_a_share_that_is_not_there_is_refused_by_every_command_and_left_uncreated(tmp_path: Path) -> None:
    missing = tmp_path / "not-mounted"
    inputs = tmp_path / "inputs.safetensors"
    inputs.write_bytes(b"")
    commands = [["coordinator", "--rounds", "2"], ["worker"], ["status"], ["status", "--json"], ["verify"],
                ["results"], ["eval"], ["export", str(tmp_path / "model.safetensors")],
                ["infer", "--inputs", str(inputs), "--out", str(tmp_path / "out.csv")], ["trust", "w1"]]
    with ThreadPoolExecutor(3) as pool:  # each is a process that starts, refuses and exits
        outs = list(pool.map(lambda c: run(*c, "--share", str(missing)), commands))
    for command, out in zip(commands, outs):
        assert out.returncode == 5, (command, out.stdout, out.stderr)
        assert f"share folder {missing} {GONE}" in out.stderr and "Traceback" not in out.stderr, (command, out.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs.safetensors"]  # nothing written anywhere


def test_verify_is_quiet_after_a_run_is_extended_twice_and_names_real_damage_once(share: Path) -> None:
    for rounds in (2, 3, 4):  # README's way to run more rounds: the same command with a larger --rounds
        coord = start("coordinator", "--share", str(share), "--rounds", str(rounds), "--set", "local_epochs=1")
        with killed_on_error(coord):  # then the workers (README): a worker that saw the old final.yaml would leave
            wait_until(lambda: _state(share) == "waiting for workers", 60, "the coordinator to wait for workers")
        worker = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--wait-for-run", "60")
        with killed_on_error(coord, worker):
            out = finish(coord, timeout=120)
            finish(worker, timeout=60)
        assert coord.returncode == 0, out
    clean = run("verify", "--share", str(share))
    assert clean.returncode == 0 and "0 error(s)" in clean.stdout, clean.stdout + clean.stderr
    # round 2's aggregate went on as round 3's global model when the run was extended: damage it there
    damaged = share / "0003" / "global.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    found = run("verify", "--share", str(share))
    assert found.returncode == 8, found.stdout + found.stderr
    errors = [line for line in found.stdout.splitlines() if "0003/global.safetensors" in line]
    assert len(errors) == 1 and "hash_mismatch" in errors[0], found.stdout  # said once, not once per reference


def test_malformed_keys_and_wrong_names_are_one_line_errors_with_the_right_status(share: Path) -> None:
    open_run(Share(share), load_config("digits"), "coordinator", coordinator_identity())
    register_worker(Share(share), "w1")
    other = load_identity(share.parent / "other.pem")[0]  # another coordinator's key
    s = str(share)
    cases = [
        (["worker", "--share", s, "--coordinator-key", "ed25519:abc"], 2, "public key is not base64"),
        (["worker", "--share", s, "--coordinator-key", "ed25519:" + "A" * 40], 2, "public key has 30 bytes, not 32"),
        (["worker", "--share", s, "--coordinator-key", "3f2a-9c1b"], 2, "does not start with 'ed25519:'"),
        (["worker", "--share", s, "--coordinator-key", other.public, "--wait-for-run", "5"], 10,
         f"names coordinator key {coordinator_identity().fingerprint}, not the {other.fingerprint} given"),
        (["worker", "--share", s, "--device", "gpu"], 2, "'gpu' is not one of auto, cpu, cuda, cuda:N, mps"),
        (["coordinator", "--share", s, "--device", "gpu"], 2, "'gpu' is not one of"),
        (["eval", "--share", s, "--device", "gpu"], 2, "'gpu' is not one of"),
        (["trust", "nosuch", "--share", s], 2, f"no worker named 'nosuch' has registered in {share} (registered: w1)"),
        (["trust", "../x", "--share", s], 2, "worker name '../x' is not allowed"),
        (["worker", "--share", s, "--name", "1e5"], 2,
         "worker name '1e5' is not allowed: YAML reads it as a number, a bool, a date or null, not a name"),
    ]
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda case: run(*case[0]), cases))
    for (args, status, words), out in zip(cases, outs):
        assert out.returncode == status, (args, out.stdout, out.stderr)
        assert words in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


def test_a_key_spelt_with_other_padding_bits_is_the_same_key(share: Path) -> None:
    """32 bytes are 43 base64 characters and a pad: the last character carries 2 bits no byte uses. A copy that
    sets them names the same key and is accepted."""
    key = coordinator_identity().public
    body = key.removeprefix("ed25519:").rstrip("=")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    variant = "ed25519:" + body[:-1] + alphabet[alphabet.index(body[-1]) | 1] + "="
    assert variant != key and base64.b64decode(variant[8:]) == base64.b64decode(key[8:])
    coord = start("coordinator", "--share", str(share), "--rounds", "1")
    worker = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--wait-for-run", "60",
                   "--coordinator-key", variant)
    with killed_on_error(coord, worker):
        out = finish(coord, timeout=120)
        worker_out = finish(worker, timeout=60)
    assert coord.returncode == 0 and worker.returncode == 0, out + worker_out
    assert "as given with --coordinator-key; this worker trains only on what that key signs" in worker_out


def test_approval_and_missing_workers_are_waited_for_out_loud(share: Path) -> None:
    """trust: explicit with two workers: each worker says it waits for approval with a command that can be pasted;
    the coordinator says how many workers it waits for, again as each is approved, and what the run does."""
    coord = start("coordinator", "--share", str(share), "--rounds", "1", "--set", "trust=explicit",
                  "--set", "min_workers=2")
    workers = {w: start("worker", "--share", str(share), "--name", w, "--device", "cpu", "--wait-for-run", "60")
               for w in ("w1", "w2")}
    with killed_on_error(coord, *workers.values()):
        wait_until(lambda: "0 so far" in _note(share), 60, "the wait to be said")
        st = run("status", "--share", str(share))
        assert "round 1 of 1: waiting for workers: round 1 opens when 2 worker(s) are live (min_workers), 0 so far" \
            in st.stdout, st.stdout
        assert json.loads(run("status", "--share", str(share), "--json").stdout)["rounds"] == 1
        for w in ("w1", "w2"):
            wait_until(lambda: (share / "workers" / f"{w}.yaml").exists(), 60, f"{w} to register")
            time.sleep(1)  # its first look at trust.yaml follows its registration within milliseconds
            ok = run("trust", w, "--share", str(share), "--fingerprint", worker_identity(w).fingerprint)
            assert ok.returncode == 0, ok.stderr
            if w == "w1":
                wait_until(lambda: "1 so far: w1" in _note(share), 60, "w1 to be counted")
        out = finish(coord, timeout=120)
        worker_out = {w: finish(p, timeout=60) for w, p in workers.items()}
    assert coord.returncode == 0, out
    fp1 = worker_identity("w1").fingerprint
    assert f"worker w1: waits for approval of its key {fp1}: run `fedsync trust w1 --share {share} --fingerprint " \
           f"{fp1}`" in out, out
    assert "0 so far" in out and "1 so far: w1" in out, out
    assert "preset fedavg: 2 local epoch(s) of lr 0.05, aggregation fedavg, server optimizer none, updates none" in out
    assert "trust explicit" in out, out
    for w, text in worker_out.items():
        fp = worker_identity(w).fingerprint
        assert f"waiting for approval: this run gives work only to approved workers (trust: explicit); training " \
               f"starts once the coordinator's operator runs `fedsync trust {w} --share {share} --fingerprint {fp}`" \
               in text, text
        assert f"approved: the coordinator trusts this worker's key {fp}" in text, text


def test_a_coordinator_that_stops_is_said_by_its_workers_by_status_and_by_itself(share: Path) -> None:
    coord = start("coordinator", "--share", str(share), "--rounds", "3", "--set", "min_workers=2")
    worker = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--wait-for-run", "60")
    with killed_on_error(coord, worker):
        wait_until(lambda: "1 so far: w1" in _note(share), 60, "w1 to be counted")
        st = run("status", "--share", str(share))
        assert "round 1 of 3: waiting for workers" in st.stdout, st.stdout  # not "of -" while no round is open
        coord.send_signal(signal.SIGTERM)
        out = finish(coord, timeout=60)
        wait_until(lambda: _state(share) == "stopped", 30, "the lease to say it stopped")
        time.sleep(3)  # the worker's next look at the share (it rescans every 2 s)
        worker.send_signal(signal.SIGINT)
        worker_out = finish(worker, timeout=60)
    assert coord.returncode == 130 and "fedsync: stopped by SIGTERM" in out, out
    assert "the coordinator stopped (stopped by SIGTERM; the same command continues the run)" in worker_out, worker_out
    assert worker.returncode == 130 and "fedsync: stopped by Ctrl-C (SIGINT)" in worker_out, worker_out
    st = run("status", "--share", str(share))
    assert "the coordinator stopped: stopped by SIGTERM" in st.stdout and "round 1 of 3" in st.stdout, st.stdout


def test_a_registration_that_does_not_count_is_said_while_the_coordinator_waits(share: Path) -> None:
    """A worker written from the protocol under the name 1e5 (which YAML 1.2 reads as 100000.0) was never counted,
    and nothing said why: the coordinator waited for min_workers in silence."""
    coord = start("coordinator", "--share", str(share), "--rounds", "1")
    with killed_on_error(coord):
        wait_until(lambda: "0 so far" in _note(share), 60, "the coordinator to wait for workers")
        register_worker(Share(share), "1e5", key=worker_identity("w-1e5"))
        time.sleep(2)  # the coordinator's next rescan reads it
        worker = start("worker", "--share", str(share), "--name", "w1", "--device", "cpu", "--wait-for-run", "60")
        with killed_on_error(worker):
            out = finish(coord, timeout=120)
            finish(worker, timeout=60)
    assert coord.returncode == 0, out
    assert f"WARNING: {share / 'workers' / '1e5.yaml'} does not count as a worker: worker name '1e5' is not " \
           "allowed: YAML reads it as a number" in out, out
