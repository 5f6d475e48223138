"""Every kind of bad file, each in its own round of one real coordinator process: rejected with its reason in
summary.yaml, the coordinator stays up, and the next global model is the aggregate of exactly the valid
updates."""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import pytest
import torch

from fedsync.storage import names
from fedsync.storage.hashing import hash_bytes
from fedsync.storage.keys import Identity, load_identity
from fedsync.storage.manifest import read_manifest
from fedsync.storage.markers import (
    FORMAT_VERSION,
    Assignment,
    FileRef,
    MarkerError,
    Summary,
    UpdateMarker,
    parse,
    to_dict,
)
from fedsync.storage.sealing import SCHEME, SealingIdentity, seal
from fedsync.storage.share import Share
from fedsync.tensors.files import load_verified, save_state, state_bytes

from .helpers import (
    finish,
    killed_on_error,
    read_yaml,
    register_worker,
    signed,
    start,
    wait_until,
    worker_identity,
    write_yaml,
)


@dataclass
class Round:
    share: Share
    r: int
    a: Assignment
    base: dict[str, torch.Tensor]
    recipient: str | None  # the run seals updates to this key (confidential_updates), as its workers do
    valid: list[tuple[dict[str, torch.Tensor], float]] = field(default_factory=list)

    def tensors_name(self, worker: str) -> str:
        return self.share.update_tensors(self.r, worker, sealed=self.recipient is not None)

    def sealed(self, data: bytes) -> bytes:
        """The bytes a worker of this run writes for a plaintext: sealed to the run's recipient."""
        return seal(data, self.recipient) if self.recipient else data

    def write_tensors(self, worker: str, update: dict[str, torch.Tensor]) -> FileRef:
        return save_state(self.share.store.write, self.tensors_name(worker), update,
                          seal=partial(seal, recipient=self.recipient) if self.recipient else None)

    def delta(self, scale: float = 1e-3) -> dict[str, torch.Tensor]:
        return {k: (torch.randn(v.shape) * scale).to(v.dtype) if v.is_floating_point() else torch.zeros_like(v)
                for k, v in self.base.items()}

    def marker(self, worker: str, ref: FileRef, /, key: Identity | None = None, **changes: object) -> dict:
        """The marker `worker` would write, with `changes`, signed with its key after them (a worker's own mistake)
        or with `key` (a forger's); `signature=None` among the changes leaves it unsigned."""
        m = to_dict(UpdateMarker(format=FORMAT_VERSION, round=self.r, worker=worker, base=self.a.model.blake3,
                                 tensors=ref, samples=100, steps=3, train_loss=0.5, seconds=0.1, device="cpu",
                                 encryption=SCHEME if self.recipient else "none"))
        m.update(changes)
        try:
            parsed = parse(UpdateMarker, m, "marker")
        except MarkerError:
            return m  # malformed on purpose: nothing to sign
        if "signature" not in changes:
            m["signature"] = signed(parsed, self.a.run_id, key)["signature"]
        return m

    def submit(self, worker: str, update: dict[str, torch.Tensor] | None = None, counts: bool = False, /,
               key: Identity | None = None, **changes: object) -> FileRef:
        """Write an update and then its marker (with `changes` to its fields), as a worker does; `counts` if
        it should be aggregated."""
        update = self.delta() if update is None else update
        ref = self.write_tensors(worker, update)
        write_yaml(self.share.path(self.share.update_marker(self.r, worker)),
                   self.marker(worker, ref, key, **changes))
        if counts:
            self.valid.append((update, float(changes.get("samples", 100))))
        return ref

    def raw(self, worker: str, data: bytes, /, sealed: bool = False, **changes: object) -> None:
        """A tensor file whose plaintext is arbitrary bytes (`sealed`: the file itself), and a marker that describes
        the file exactly."""
        path = self.share.path(self.tensors_name(worker))
        path.write_bytes(data if sealed else self.sealed(data))
        data = path.read_bytes()
        ref = FileRef(path.name, hash_bytes(data), len(data))
        write_yaml(self.share.path(self.share.update_marker(self.r, worker)), self.marker(worker, ref, **changes))

    def good(self) -> None:
        self.submit("good", None, True)


@dataclass
class Case:
    act: Callable[[Round], None]
    reason: str | None               # what summary.yaml says of `worker`; None: nothing rejected
    worker: str = "bad"
    ignored: tuple[str, ...] = ()
    good_first: bool = True


def _with(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Round], None]:
    def act(rd: Round) -> None:
        t = rd.delta()
        change(t)
        rd.submit("bad", t)
    return act


def _first_float(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """safetensors returns tensors in no fixed order: poison a floating one on purpose."""
    return next(v for v in t.values() if v.is_floating_point()).view(-1)


def _truncated(rd: Round) -> None:
    """The marker describes the whole update, the file holds all but its last 64 bytes (a copy cut short). Cut
    before the marker is written: cutting it after would race a coordinator fast enough to read it whole first."""
    data = rd.sealed(state_bytes(rd.delta()))
    path = rd.share.path(rd.tensors_name("bad"))
    path.write_bytes(data[:-64])
    write_yaml(rd.share.path(rd.share.update_marker(rd.r, "bad")),
               rd.marker("bad", FileRef(path.name, hash_bytes(data), len(data))))


def _torch_save(rd: Round) -> None:
    path = rd.share.path(rd.tensors_name("bad"))
    torch.save(rd.delta(), path)
    rd.raw("bad", path.read_bytes())


def _symlink(rd: Round) -> None:
    target = rd.share.path(rd.share.global_model(rd.r))
    link = rd.share.path(rd.tensors_name("bad"))
    link.symlink_to(target)
    ref = FileRef(link.name, rd.a.model.blake3, rd.a.model.bytes)
    write_yaml(rd.share.path(rd.share.update_marker(rd.r, "bad")), rd.marker("bad", ref))


def _marker_text(text: str | bytes) -> Callable[[Round], None]:
    def act(rd: Round) -> None:
        rd.write_tensors("bad", rd.delta())
        data = text.encode() if isinstance(text, str) else text
        rd.share.path(rd.share.update_marker(rd.r, "bad")).write_bytes(data)
    return act


def _weights_only(delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A delta whose BatchNorm statistics stay put: large values there are invalid_state before any norm counts."""
    return {k: torch.zeros_like(v) if "running" in k else v for k, v in delta.items()}


def _duplicate(rd: Round) -> None:
    rd.submit("bad")  # accepted first ...
    time.sleep(0.45)
    rd.submit("bad")  # ... then rewritten: a duplicate, and the bytes verified are gone, so it no longer counts
    time.sleep(0.45)
    rd.good()


def _replayed(edit: bool) -> Callable[[Round], None]:
    """The bad worker's accepted update of round 1 copied into this round, its round and base edited or not."""
    def act(rd: Round) -> None:
        old = rd.share.path(rd.share.round_dir(1)) / "updates"
        new = rd.share.path(rd.share.updates_dir(rd.r))
        tensors = names.basename(rd.tensors_name("bad"))
        (new / tensors).write_bytes((old / tensors).read_bytes())
        marker = read_yaml(old / "bad.yaml")
        if edit:
            marker.update(round=rd.r, base=rd.a.model.blake3)
        write_yaml(new / "bad.yaml", marker)
    return act


def _renamed(rd: Round) -> None:
    """The good worker's signed marker and tensors presented as the bad worker's."""
    ref = rd.write_tensors("bad", rd.delta())
    forged = rd.marker("good", ref, worker_identity("good"))  # good's own, signed by good ...
    forged["worker"] = "bad"  # ... with its name edited afterwards
    write_yaml(rd.share.path(rd.share.update_marker(rd.r, "bad")), forged)


def _rekeyed(rd: Round) -> None:
    """The bad worker comes back with a new key (pinned: the old one) and signs with it."""
    new_key = load_identity(rd.share.root.parent / "rekeyed.pem")[0]
    register_worker(rd.share, "bad", beat=1000 + rd.r, key=new_key)
    time.sleep(0.5)  # the coordinator reads the new registration before the marker
    rd.submit("bad", None, False, new_key)


def _forged_then_real(rd: Round) -> None:
    """A forger writes under the good worker's name first; the good worker's own update replaces it and counts."""
    rd.submit("good", rd.delta(0.5), False, worker_identity("bad"))
    time.sleep(0.45)
    rd.good()


def _stranger(rd: Round) -> None:
    rd.submit("stranger")


def _conflict_and_temp(rd: Round) -> None:
    updates = rd.share.path(rd.share.updates_dir(rd.r))
    (updates / "bad.sync-conflict-20261123-101010-ABCDEFG.yaml").write_text("format: 2\n")
    (updates / ".syncthing.bad.safetensors.tmp").write_bytes(b"partial")


def _wrong_folder(rd: Round) -> None:
    folder = rd.share.round_dir(rd.r)
    ref = save_state(rd.share.write, f"{folder}/bad.safetensors", rd.delta())
    write_yaml(rd.share.path(f"{folder}/bad.yaml"), rd.marker("bad", ref))


def _plain_in_a_sealed_run(rd: Round) -> None:
    """An old or hand-made worker that writes its update readable to everyone."""
    ref = save_state(rd.share.store.write, rd.share.update_tensors(rd.r, "bad"), rd.delta())
    write_yaml(rd.share.path(rd.share.update_marker(rd.r, "bad")), rd.marker("bad", ref, encryption="none"))


def _sealed_header_edited(rd: Round) -> None:
    """A sealed file whose header was edited before the marker was written (its hash is the marker's)."""
    data = rd.sealed(state_bytes(rd.delta()))
    rd.raw("bad", data.replace(b"-> X25519 ", b"-> X25519 x", 1), sealed=True)


BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
CASES: dict[str, Case] = {
    "valid pair": Case(lambda rd: rd.submit("bad", None, True), None),
    "truncated safetensors": Case(_truncated, "size_mismatch"),
    "plain update in a sealed run": Case(_plain_in_a_sealed_run, "not_sealed"),
    "sealed to another key": Case(lambda rd: rd.raw("bad", seal(state_bytes(rd.delta()),
                                                               SealingIdentity.generate().recipient), sealed=True),
                                  "undecryptable"),
    "sealed file with an edited header": Case(_sealed_header_edited, "undecryptable"),
    "random bytes": Case(lambda rd: rd.raw("bad", os.urandom(4096)), "not_safetensors"),
    "pickle": Case(lambda rd: rd.raw("bad", pickle.dumps({"w": [1.0, 2.0]})), "not_safetensors"),
    "torch.save": Case(_torch_save, "not_safetensors"),
    "missing tensor": Case(_with(lambda t: t.pop(next(iter(t)))), "missing_tensor"),
    "extra tensor": Case(_with(lambda t: t.update(evil=torch.ones(3))), "extra_tensor"),
    "wrong shape": Case(_with(lambda t: t.update({k: torch.zeros(v.numel() + 1) for k, v in list(t.items())[:1]})),
                        "wrong_shape"),
    "wrong dtype": Case(_with(lambda t: t.update({k: v.double() for k, v in list(t.items())[:1]})), "wrong_dtype"),
    "nan": Case(_with(lambda t: _first_float(t).__setitem__(0, float("nan"))), "non_finite"),
    "inf": Case(_with(lambda t: _first_float(t).__setitem__(-1, float("inf"))), "non_finite"),
    "huge values": Case(_with(lambda t: [v.fill_(1e38) for v in t.values() if v.is_floating_point()]),
                        "norm_outlier"),
    "scaled x1000": Case(lambda rd: rd.submit("bad", _weights_only(rd.delta(1.0))), "norm_outlier"),
    "diverged marker": Case(lambda rd: rd.submit("bad", tensors=None, diverged="train loss nan"), "diverged"),
    "no tensors": Case(lambda rd: rd.submit("bad", tensors=None), "marker_invalid"),
    "nan train loss": Case(lambda rd: rd.submit("bad", train_loss=float("nan")), "marker_invalid"),
    "hash mismatch": Case(lambda rd: _hash_mismatch(rd), "hash_mismatch"),
    "marker for another round": Case(lambda rd: rd.submit("bad", round=rd.r + 1), "wrong_round"),
    "path with ..": Case(lambda rd: rd.submit("bad", tensors={"file": "../global.safetensors",
                                                              "blake3": rd.a.model.blake3, "bytes": 1}), "bad_path"),
    "absolute path": Case(lambda rd: rd.submit("bad", tensors={"file": "/etc/passwd", "blake3": "00" * 32,
                                                               "bytes": 1}), "bad_path"),
    "symlink": Case(_symlink, "bad_path"),
    "invalid yaml": Case(_marker_text("format: 1\nround: [unclosed\n"), "marker_unreadable"),
    "yaml bomb": Case(_marker_text(BOMB), "marker_unreadable"),
    "oversize marker": Case(_marker_text(b"format: 1\n#" + b"x" * (2 << 20)), "marker_unreadable"),
    "unknown worker": Case(_stranger, "not_assigned", worker="stranger"),
    "duplicate submission": Case(_duplicate, "duplicate", good_first=False),
    "conflict copy and temp file": Case(_conflict_and_temp, None,
                                        ignored=("updates/bad.sync-conflict-20261123-101010-ABCDEFG.yaml",)),
    "files in the round folder": Case(_wrong_folder, None, ignored=("bad.safetensors", "bad.yaml")),
    "wrong worker field": Case(lambda rd: rd.submit("bad", worker="good"), "wrong_worker"),
    "other format": Case(lambda rd: rd.submit("bad", format=FORMAT_VERSION + 1), "format_mismatch"),
    "wrong base model": Case(lambda rd: rd.submit("bad", base="ab" * 32), "wrong_base"),
    "zero samples": Case(lambda rd: rd.submit("bad", samples=0), "bad_samples"),
    "evaluation accuracy over 1": Case(lambda rd: rd.submit("bad", evaluation={"loss": 0.1, "accuracy": 1.5,
                                                                              "samples": 10}), "marker_invalid"),
    "more held out than exists": Case(lambda rd: rd.submit("bad", evaluation={"loss": 0.1, "accuracy": 0.5,
                                                                             "samples": 10**6}), "bad_samples"),
    "sign-flipped x1000": Case(lambda rd: rd.submit("bad", {k: -v for k, v in _weights_only(rd.delta(1.0)).items()}),
                               "norm_outlier"),
    "unsigned": Case(lambda rd: rd.submit("bad", signature=None), "unsigned"),
    "signed with another key": Case(lambda rd: rd.submit("bad", None, False, worker_identity("good")),
                                    "bad_signature"),
    "replayed unchanged": Case(_replayed(edit=False), "wrong_round"),
    "replayed with round and base edited": Case(_replayed(edit=True), "bad_signature"),
    "renamed from another worker": Case(_renamed, "bad_signature"),
    "forged under another name, then the real one": Case(_forged_then_real, None, good_first=False),
    "re-keyed worker": Case(_rekeyed, "untrusted_key"),  # last: the bad worker's registration changes
}


def _hash_mismatch(rd: Round) -> None:
    ref = rd.write_tensors("bad", rd.delta())
    write_yaml(rd.share.path(rd.share.update_marker(rd.r, "bad")), rd.marker("bad", ref, tensors={
        "file": ref.file, "blake3": "cd" * 32, "bytes": ref.bytes}))



@pytest.fixture(scope="module")
def bad_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Share, dict[str, Round], str, int | None]:
    share = Share(tmp_path_factory.mktemp("bad") / "share")
    share.root.mkdir()
    cases = list(CASES)
    coord = start("coordinator", "--share", str(share.root), "--rounds", str(len(cases)), "--set", "min_workers=2",
                  "--set", "round_timeout=1.5", "--set", "worker_timeout=120", "--set", "heartbeat=5",
                  "--set", "exclude_after=0")  # "bad" is rejected round after round on purpose
    rounds: dict[str, Round] = {}
    with killed_on_error(coord):
        for r, name in enumerate(cases, 1):
            for w in ("good", "bad"):
                register_worker(share, w, beat=r)
            wait_until(lambda: share.exists(share.assignment(r)), 60, f"round {r} to open")
            a = parse(Assignment, share.read_yaml(share.assignment(r)), "a")
            base = load_verified(share, share.global_model(r), a.model)
            rd = Round(share, r, a, base, read_manifest(share).recipient)
            case = CASES[name]
            if case.good_first:
                rd.good()
            case.act(rd)
            rounds[name] = rd
            wait_until(lambda: share.exists(share.summary(r)), 30, f"round {r} ({name}) to close")
    out = finish(coord, timeout=60)
    return share, rounds, out, coord.returncode


@pytest.mark.processes
def test_the_coordinator_stayed_up(bad_run) -> None:
    share, rounds, out, code = bad_run
    assert code == 0, out
    assert "Traceback" not in out


@pytest.mark.processes
@pytest.mark.parametrize("name", list(CASES))
def test_bad_file(bad_run, name: str) -> None:
    share, rounds, out, _ = bad_run
    case, rd = CASES[name], rounds[name]
    s = parse(Summary, share.read_yaml(share.summary(rd.r)), "summary")
    rejected = {(x.worker, x.reason) for x in s.rejected}
    if case.reason is None:
        assert rejected == set(), s.rejected
    else:
        assert (case.worker, case.reason) in rejected, s.rejected
    for path in case.ignored:
        assert path in s.ignored, s.ignored
    assert sorted(x.worker for x in s.accepted) == sorted(
        ["good"] + (["bad"] if name == "valid pair" else []))
    # the next model is the old one plus the weighted mean of exactly the valid updates
    after = load_verified(share, s.model.file, s.model)
    total = sum(w for _, w in rd.valid)
    for k, v in rd.base.items():
        expected = sum(t[k].double() * w for t, w in rd.valid) / total
        assert torch.isfinite(after[k].double()).all()
        if v.is_floating_point():
            torch.testing.assert_close(after[k].double(), v.double() + expected, atol=1e-6, rtol=1e-5)
        else:
            assert torch.equal(after[k], v + expected.round().to(v.dtype))
