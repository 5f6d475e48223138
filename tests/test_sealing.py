"""Sealed updates (docs/PROTOCOL.md section 5.15): the age format byte for byte against two independent
implementations (rage through pyrage, and the `age` command), every way a sealed file can be bad, and the intake
reading sealed updates to exactly the aggregate of the same plain ones."""

from __future__ import annotations

import base64
import dataclasses
import os
import subprocess
from functools import partial
from pathlib import Path

import pyrage
import pytest
import torch

from fedsync.aggregation.candidates import Candidate
from fedsync.aggregation.intake import Aggregator
from fedsync.aggregation.rules import FedAvg, Median
from fedsync.base.errors import TrustError
from fedsync.run.config import config_from_dict, load_config
from fedsync.run.coordinating.ledger import Bound, RoundLedger
from fedsync.run.start import open_run, sealing_key
from fedsync.run.trust import Trust
from fedsync.storage import names
from fedsync.storage.hashing import hash_bytes
from fedsync.storage.keys import load_identity, load_sealing_identity, sealing_key_path
from fedsync.storage.local import LocalStore
from fedsync.storage.manifest import read_manifest, sealing_recipient
from fedsync.storage.markers import FORMAT_VERSION, Assignment, FileRef, UpdateMarker, WorkerTask, to_dict
from fedsync.storage.reasons import Reason, Unusable
from fedsync.storage.sealing import (
    CHUNK,
    NotAKey,
    SealedReader,
    SealingIdentity,
    bech32_decode,
    seal,
    sealed_head,
)
from fedsync.storage.share import Share
from fedsync.storage.store import read_exact
from fedsync.tensors.files import layout_of, save_state, state_bytes

from .helpers import coordinator_identity, require, signed, worker_identity, write_yaml

SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17]


def _plain(store: LocalStore, name: str, opener: SealingIdentity) -> bytes:
    with store.open(name) as f:
        reader = SealedReader(f, opener).start()
        out = bytearray(reader.size)
        read_exact(reader, memoryview(out))
    return bytes(out)


@pytest.mark.parametrize("size", SIZES)
def test_sealed_files_open_with_rage_and_rage_files_open_here(tmp_path: Path, size: int) -> None:
    store, key = LocalStore(tmp_path), SealingIdentity.generate()
    data = os.urandom(size)
    store.write("ours.age", seal(data, key.recipient))
    rage_key = pyrage.x25519.Identity.from_str(key.text().splitlines()[-1])
    assert pyrage.decrypt((tmp_path / "ours.age").read_bytes(), [rage_key]) == data
    store.write("theirs.age", pyrage.encrypt(data, [pyrage.x25519.Recipient.from_str(key.recipient)]))
    assert _plain(store, "ours.age", key) == data and _plain(store, "theirs.age", key) == data


def test_the_documented_age_command_opens_an_update_and_age_files_open_here(tmp_path: Path) -> None:
    """`age -d -i coordinator.age` (README, PROTOCOL.md section 5.15) with the very key file fedsync creates."""
    require("age", "apt-get install age (Debian) or brew install age")
    signing, _ = load_identity(tmp_path / "keys" / "coordinator.pem")
    opener, created = load_sealing_identity(sealing_key_path(signing.path))
    assert created and sealing_key_path(signing.path) == tmp_path / "keys" / "coordinator.age"
    assert (tmp_path / "keys" / "coordinator.age").stat().st_mode & 0o077 == 0
    update = state_bytes({"w": torch.randn(70_000), "b": torch.arange(5)})
    (tmp_path / "w1.safetensors.age").write_bytes(seal(update, opener.recipient))
    subprocess.run(["age", "-d", "-i", str(tmp_path / "keys" / "coordinator.age"), "-o", str(tmp_path / "w1.st"),
                    str(tmp_path / "w1.safetensors.age")], check=True, timeout=30)
    assert (tmp_path / "w1.st").read_bytes() == update
    subprocess.run(["age", "-r", opener.recipient, "-o", str(tmp_path / "by_age.age"), str(tmp_path / "w1.st")],
                   check=True, timeout=30)
    assert _plain(LocalStore(tmp_path), "by_age.age", opener) == update
    other = SealingIdentity.generate()  # anyone else's key: a worker's, a reader's
    (tmp_path / "other.key").write_text(other.text())
    refused = subprocess.run(["age", "-d", "-i", str(tmp_path / "other.key"), str(tmp_path / "w1.safetensors.age")],
                             capture_output=True, timeout=30)
    assert refused.returncode != 0 and refused.stdout == b""


def test_keys_are_the_specifications_example_pair_and_typos_are_refused() -> None:
    """age.md's X25519 example: this identity's recipient is that recipient."""
    identity = SealingIdentity.parse("AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX")
    assert identity.recipient == "age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj"
    assert SealingIdentity.parse(identity.text()).recipient == identity.recipient  # its own file format
    rage = pyrage.x25519.Identity.generate()
    assert SealingIdentity.parse(str(rage)).recipient == str(rage.to_public())
    for bad, why in [("age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwx", "checksum"),
                     ("age1Zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj", "mixes"),
                     ("ed25519:9wpsdeerabab9vdkxqgmnr8x6unms5s4hjx4hqrp4y4=", "not Bech32")]:
        with pytest.raises(NotAKey, match=why):
            bech32_decode(bad)
    with pytest.raises(NotAKey, match="not an age X25519 identity"):
        SealingIdentity.parse(identity.recipient)


def test_any_range_reads_by_decrypting_only_the_chunks_it_touches(tmp_path: Path) -> None:
    store, key = LocalStore(tmp_path), SealingIdentity.generate()
    data = os.urandom(5 * CHUNK + 123)
    store.write("f.age", seal(data, key.recipient))
    g = torch.Generator().manual_seed(0)
    with store.open("f.age") as f:
        reader = SealedReader(f, key).start()
        for _ in range(50):
            start = int(torch.randint(0, len(data), (1,), generator=g))
            length = int(torch.randint(0, min(3 * CHUNK, len(data) - start) + 1, (1,), generator=g))
            out = bytearray(length)
            reader.seek(start)
            read_exact(reader, memoryview(out))
            assert bytes(out) == data[start:start + length]


def _damaged(what: str, data: bytes, key: SealingIdentity) -> bytes:
    """`data` sealed to `key`, then damaged as `what` says (the reason the reader must give)."""
    if what == "not sealed to this coordinator's key":
        return seal(data, SealingIdentity.generate().recipient)
    sealed = seal(data, key.recipient)
    mac = sealed.index(b"\n---") + 1
    payload = sealed.index(b"\n", mac) + 1 + 16  # after the MAC line and the payload's nonce
    flip = lambda at: sealed[:at] + bytes([sealed[at] ^ 1]) + sealed[at + 1:]  # noqa: E731
    return {
        "not an age file": b"PK\x03\x04" + sealed[4:],
        "not canonical base64": sealed.replace(b"-> X25519 ", b"-> X25519 A", 1),
        "MAC does not verify": sealed[:mac + 4] + base64.b64encode(os.urandom(32)).rstrip(b"=") + sealed[mac + 47:],
        "chunk 0 of 2 does not decrypt": flip(payload + 5),
        "chunk 1 of 2 does not decrypt": flip(len(sealed) - 3),  # the last chunk's tag
        "chunk 0 of 1 does not decrypt": sealed[:payload + CHUNK + 16],  # cut at a chunk: no final chunk
        "partial or empty chunk": sealed[:payload + CHUNK + 16 + 7],
        "does not end with its MAC line": sealed[:mac + 20],
    }[what]


DAMAGE = ["not sealed to this coordinator's key", "not an age file", "not canonical base64", "MAC does not verify",
          "chunk 0 of 2 does not decrypt", "chunk 1 of 2 does not decrypt", "chunk 0 of 1 does not decrypt",
          "partial or empty chunk", "does not end with its MAC line"]


@pytest.mark.parametrize("what", DAMAGE)
def test_every_damaged_sealed_file_is_undecryptable_with_its_reason(tmp_path: Path, what: str) -> None:
    store, key = LocalStore(tmp_path), SealingIdentity.generate()
    store.write("f.age", _damaged(what, os.urandom(CHUNK + 50), key))
    with pytest.raises(Unusable, match=what) as caught:
        _plain(store, "f.age", key)
    assert caught.value.reason == Reason.UNDECRYPTABLE


# --- the intake ---------------------------------------------------------------------------------------------------

BASE = {"w": torch.zeros(3 * CHUNK // 4 + 5), "b": torch.zeros(7), "n": torch.zeros((), dtype=torch.int64)}


def _updates() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"w": torch.randn(BASE["w"].shape, generator=g), "b": torch.randn(7, generator=g),
             "n": torch.tensor(i + 1)} for i in range(4)]


def _candidates(store: LocalStore, opener: SealingIdentity | None, encoding: str = "none",
                head: bool = False) -> list[Candidate]:
    """The four updates written as workers write them; with `head`, each names its sealed head as markers now do."""
    out = []
    for i, u in enumerate(_updates()):
        worker = f"w{i}"
        name = names.update_tensors(1, worker, sealed=opener is not None)
        ref = save_state(store.write, name, u, seal=partial(seal, recipient=opener.recipient) if opener else None)
        out.append(Candidate(worker, name, ref, weight=10.0 * (i + 1), round=1, encoding=encoding,
                             sealed=opener is not None,
                             head=sealed_head(store.read(name, 1 << 30)) if head and opener else None))
    return out


@pytest.mark.parametrize("rule", [FedAvg(), Median()], ids=["fedavg", "median"])
def test_sealed_updates_aggregate_to_exactly_what_the_same_plain_updates_do(tmp_path: Path, rule: object) -> None:
    """Bit for bit, with the weighted mean of one pass and with a rule that reads aligned slices again."""
    opener = SealingIdentity.generate()
    results = []
    for sealed in (False, True):
        store = LocalStore(tmp_path / str(sealed))
        agg = Aggregator(layout_of(BASE), store, lanes=1, round=1, opener=opener if sealed else None)
        outcomes = agg.take(_candidates(store, opener if sealed else None))
        assert [o.problem for o in outcomes] == [None] * 4
        delta = rule.aggregate(agg.collected(frozenset({"w", "b"}))).delta  # type: ignore[attr-defined]
        results.append((delta, agg.norms))
        files = [(tmp_path / str(sealed) / c.name).read_bytes() for c in agg.accepted]
        if sealed:
            assert all(not f.startswith(state_bytes(BASE)[:8]) and f.startswith(b"age-encryption.org/v1\n")
                       for f in files)
    (plain, plain_norms), (sealed_result, sealed_norms) = results
    assert all(torch.equal(plain[k], sealed_result[k]) for k in plain)
    assert list(plain_norms.values()) == list(sealed_norms.values())


def test_a_sealed_update_that_does_not_open_is_undecryptable_and_one_half_synced_waits(tmp_path: Path) -> None:
    store, opener = LocalStore(tmp_path), SealingIdentity.generate()
    good, wrong_key, half = _candidates(store, opener)[:3]
    stranger = seal(state_bytes(_updates()[1]), SealingIdentity.generate().recipient)
    store.write(wrong_key.name, stranger)  # sealed to someone else, with the marker's hash of those bytes
    wrong_key = Candidate(wrong_key.worker, wrong_key.name, FileRef(names.basename(wrong_key.name),
                          hash_bytes(stranger), len(stranger)), wrong_key.weight, 1, sealed=True)
    sealed = (tmp_path / half.name).read_bytes()
    store.write(half.name, sealed[:len(sealed) // 2] + bytes(len(sealed) - len(sealed) // 2))  # not all arrived
    no_key = Aggregator(layout_of(BASE), store, round=1)
    assert no_key.take([good])[0].problem.reason == Reason.UNDECRYPTABLE  # type: ignore[union-attr]
    agg = Aggregator(layout_of(BASE), store, lanes=1, round=1, opener=opener)
    problems = {o.candidate.worker: o.problem for o in agg.take([good, wrong_key, half])}
    assert problems["w0"] is None
    assert problems["w1"].reason == Reason.UNDECRYPTABLE and "not sealed to this" in problems["w1"].detail  # type: ignore[union-attr]
    assert problems["w2"].reason == Reason.HASH_MISMATCH and problems["w2"].reason.waits  # type: ignore[union-attr]
    assert [c.worker for c in agg.accepted] == ["w0"]
    torch.testing.assert_close(FedAvg().aggregate(agg.collected(frozenset({"w", "b"}))).delta["w"], _updates()[0]["w"])


def test_a_signed_head_and_the_payloads_tags_prove_a_sealed_file_without_hashing_it_whole(tmp_path: Path) -> None:
    """With the marker's sealed_head the intake hashes only the header and nonce: the same result as hashing the
    file whole; a file resealed by anyone else to the same recipient (same size, the marker kept) has another head
    and waits as unsynced; a damaged payload under the signed head fails its tag and is told from an unsynced one by
    hashing the file whole, as before."""
    store, opener = LocalStore(tmp_path), SealingIdentity.generate()
    cands = _candidates(store, opener, head=True)
    assert all(c.head for c in cands)
    agg = Aggregator(layout_of(BASE), store, lanes=1, round=1, opener=opener)
    assert [o.problem for o in agg.take(cands)] == [None] * 4
    headed = FedAvg().aggregate(agg.collected(frozenset({"w", "b"}))).delta
    whole = Aggregator(layout_of(BASE), store, lanes=1, round=1, opener=opener)
    whole.take([dataclasses.replace(c, head=None) for c in cands])
    assert all(torch.equal(v, FedAvg().aggregate(whole.collected(frozenset({"w", "b"}))).delta[k])
               for k, v in headed.items())
    forged, damaged = cands[1], cands[2]
    resealed = seal(state_bytes(_updates()[3]), opener.recipient)  # anyone can seal to the recipient
    assert len(resealed) == forged.ref.bytes
    store.write(forged.name, resealed)
    data = bytearray(store.read(damaged.name, 1 << 30))
    data[-100] ^= 1  # a payload byte: the signed head still matches
    store.write(damaged.name, bytes(data))
    signed_damage = dataclasses.replace(damaged, ref=FileRef(damaged.ref.file, hash_bytes(bytes(data)), len(data)))
    again = Aggregator(layout_of(BASE), store, lanes=1, round=1, opener=opener)
    problems = {o.candidate.worker + str(o.candidate.ref.blake3 == signed_damage.ref.blake3): o.problem
                for o in again.take([forged, damaged, signed_damage])}
    assert problems["w1False"].reason == Reason.HASH_MISMATCH and "sealed_head" in problems["w1False"].detail  # type: ignore[union-attr]
    assert problems["w2False"].reason == Reason.HASH_MISMATCH and "file's BLAKE3" in problems["w2False"].detail  # type: ignore[union-attr]
    assert problems["w2True"].reason == Reason.UNDECRYPTABLE  # type: ignore[union-attr]


# --- the run: keys, fedsync.yaml, markers -------------------------------------------------------------------------

def _assignment(s: Share, run_id: str) -> Assignment:
    ref = save_state(s.store.write, s.global_model(1), BASE)
    a = Assignment(format=FORMAT_VERSION, run_id=run_id, round=1, rounds=1, model=ref, num_shards=2,
                   time_budget_s=60.0, workers={w: WorkerTask(shard=i, local_epochs=1) for i, w in enumerate("ab")},
                   shards=FileRef("shards/002.safetensors", "cd" * 32, 10))
    write_yaml(s.path(s.assignment(1)), to_dict(a))
    return a


def _marker(s: Share, a: Assignment, worker: str, data: bytes, file: str, encryption: str) -> None:
    s.store.write(names.join(s.updates_dir(1), file), data)
    m = UpdateMarker(format=FORMAT_VERSION, round=1, worker=worker, base=a.model.blake3,
                     tensors=FileRef(file, hash_bytes(data), len(data)), samples=10, steps=1, train_loss=1.0,
                     seconds=1.0, device="cpu", encryption=encryption)
    write_yaml(s.path(s.update_marker(1, worker)), signed(m, a.run_id))


def test_the_ledger_refuses_a_plain_update_in_a_sealed_run_and_a_sealed_one_in_a_plain_run(tmp_path: Path) -> None:
    s = Share(tmp_path)
    manifest = open_run(s, load_config("digits"), "coordinator", coordinator_identity())
    a = _assignment(s, manifest.run_id)
    plain = state_bytes(_updates()[0])
    _marker(s, a, "a", plain, "a.safetensors", "none")
    _marker(s, a, "b", seal(plain, manifest.recipient or ""), "b.safetensors.age", "age")
    trust = Trust(s, a.run_id, coordinator_identity(), "tofu", lambda n: worker_identity(n).public, print)
    assert trust.admit_all(["a", "b"]) == ["a", "b"]
    bound = lambda a, w: Bound(99, 99, "the test's bound")  # noqa: E731
    sealed_run = RoundLedger(s, 1, a, bound, FedAvg(), trust, sealed=True)
    assert [c.worker for c in sealed_run.scan()] == ["b"] and sealed_run.rejected["a"].reason == "not_sealed"
    plain_run = RoundLedger(s, 1, a, bound, FedAvg(), trust, sealed=False)
    assert [c.worker for c in plain_run.scan()] == ["a"] and plain_run.rejected["b"].reason == "undecryptable"


def test_a_worker_seals_only_to_the_recipient_the_coordinator_signed(tmp_path: Path) -> None:
    s = Share(tmp_path)
    coordinator = coordinator_identity()
    manifest = open_run(s, load_config("digits"), "coordinator", coordinator)
    assert sealing_recipient(manifest, coordinator.public) == manifest.recipient
    assert manifest.recipient == load_sealing_identity(sealing_key_path(coordinator.path))[0].recipient
    swapped = read_manifest(s)
    swapped.recipient = SealingIdentity.generate().recipient  # a share writer's own key, to read what is sealed
    with pytest.raises(TrustError, match="did not sign"):
        sealing_recipient(swapped, coordinator.public)
    with pytest.raises(TrustError, match="did not sign"):  # signed, but not by the coordinator this worker pinned
        sealing_recipient(read_manifest(s), worker_identity("a").public)
    plain = open_run(Share(tmp_path / "plain"), load_config("digits", {"confidential_updates": False}),
                     "coordinator", coordinator)
    assert plain.recipient is None and sealing_recipient(plain, coordinator.public) is None


def test_a_coordinator_continues_a_sealed_run_only_with_the_key_that_opens_it(tmp_path: Path) -> None:
    s = Share(tmp_path / "share")
    manifest = open_run(s, load_config("digits"), "coordinator", coordinator_identity())
    elsewhere, _ = load_identity(tmp_path / "other" / "coordinator.pem")  # another machine's keys
    with pytest.raises(TrustError, match="copy the key that opens them here"):
        sealing_key(load_config("digits"), elsewhere, manifest)
    load_sealing_identity(sealing_key_path(elsewhere.path))  # a key of its own: not the run's
    with pytest.raises(TrustError, match="run the coordinator with the key the run was started with"):
        sealing_key(load_config("digits"), elsewhere, manifest)
    opener, created = sealing_key(load_config("digits"), coordinator_identity(), manifest)
    assert opener is not None and opener.recipient == manifest.recipient and not created


def test_a_run_from_before_the_setting_keeps_plain_updates(tmp_path: Path) -> None:
    """A fedsync.yaml whose config lacks confidential_updates (written before it existed) is a plain run."""
    s = Share(tmp_path)
    coordinator = coordinator_identity()
    manifest = open_run(s, load_config("digits", {"confidential_updates": False}), "coordinator", coordinator)
    del manifest.config["confidential_updates"]
    assert not config_from_dict(manifest.config, "fedsync.yaml").confidential_updates
    assert sealing_recipient(manifest, coordinator.public) is None
    assert sealing_key(config_from_dict(manifest.config, "fedsync.yaml"), coordinator, manifest) == (None, False)
