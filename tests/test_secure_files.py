"""A secure-aggregation round driven in one process with fedsync's own worker and coordinator code over a real
share, with bad files at each step: a forged keys file, one replayed from another round, an envelope sealed to
the wrong key, a masked input of the wrong size. Each is left out with its reason, and the coordinator's sum is the
survivors' weighted mean within the encoding's bound, exactly checkable here because the test knows each delta."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import numpy as np
import torch

from fedsync.aggregation.optimizers import ServerSettings, make_optimizer
from fedsync.aggregation.secagg.encoding import Encoding
from fedsync.aggregation.secagg.envelope import RoundSecrets, seal_envelope
from fedsync.aggregation.secagg.vector import flatten, length
from fedsync.run.config import load_config
from fedsync.run.coordinating.ledger import Bound
from fedsync.run.coordinating.secure import SecureRound
from fedsync.run.start import open_run
from fedsync.run.trust import Trust
from fedsync.run.working.secure import SecureWorker
from fedsync.storage import names
from fedsync.storage.keys import load_identity
from fedsync.storage.markers import FORMAT_VERSION, Assignment, FileRef, UpdateMarker, WorkerTask, to_dict
from fedsync.storage.secagg_files import SecaggKeys, SecaggShares, keys_message, shares_message
from fedsync.storage.share import Share
from fedsync.storage.signing import assignment_message, update_message
from fedsync.storage.yamlfile import dump_yaml
from fedsync.tensors.files import layout_of, save_state

from .helpers import coordinator_identity, worker_identity, write_yaml

BASE = {"w": torch.zeros(4000), "b": torch.zeros(3), "n": torch.zeros((), dtype=torch.int64)}
HONEST = ["w0", "w1", "w2", "w3", "w4"]


def _marker(s: Share, a: Assignment, w: str, tensors: dict[str, torch.Tensor], samples: int) -> None:
    ref = save_state(s.store.write, s.update_tensors(1, w), tensors)
    m = UpdateMarker(format=FORMAT_VERSION, round=1, worker=w, base=a.model.blake3, tensors=ref, samples=samples,
                     steps=3, train_loss=1.0, seconds=1.0, device="cpu", encoding="secagg")
    m.signature = worker_identity(w).sign(update_message(a.run_id, m))
    s.store.write(s.update_marker(1, w), dump_yaml(to_dict(m)))


def _open(tmp_path: Path, assigned: list[str], budget: float) -> tuple[Share, Assignment, SecureRound,
                                                                    dict[str, SecureWorker], list[str]]:
    """Round 1 of a secure run, open: its assignment, the coordinator's SecureRound, each honest worker's steps, and
    the coordinator's log lines."""
    s = Share(tmp_path / "share")
    cfg = load_config("digits", {"secure_aggregation": True, "clip_norm": 5, "round_timeout": budget})
    coordinator = coordinator_identity()
    run_id = open_run(s, cfg, "coordinator", coordinator).run_id
    model = save_state(s.store.write, s.global_model(1), BASE)
    a = Assignment(format=FORMAT_VERSION, run_id=run_id, round=1, rounds=1, model=model, num_shards=len(assigned),
                   time_budget_s=budget,
                   workers={w: WorkerTask(shard=i, local_epochs=1) for i, w in enumerate(assigned)},
                   shards=FileRef(f"shards/{len(assigned):03d}.safetensors", "cd" * 32, 10))
    a.signature = coordinator.sign(assignment_message(a))
    write_yaml(s.path(s.assignment(1)), to_dict(a))
    trust = Trust(s, run_id, coordinator, "tofu", lambda n: worker_identity(n).public, print)
    assert trust.admit_all(assigned) == assigned
    said: list[str] = []
    secure = SecureRound(s, 1, a, dict(BASE), cfg, lambda a, w: Bound(200, 200, "the test's bound"), trust,
                         coordinator, said.append)
    workers = {w: SecureWorker(s, run_id, w, worker_identity(w), coordinator.public, print) for w in HONEST}
    return s, a, secure, workers, said


def test_bad_files_at_each_step_are_left_out_and_the_sum_is_the_survivors_mean(tmp_path: Path) -> None:
    assigned = [*HONEST, "w5", "mallory"]
    s, a, secure, workers, said = _open(tmp_path, assigned, 8.0)
    run_id = a.run_id
    optimizer = make_optimizer(ServerSettings("none"), frozenset({"w", "b"}))
    g = torch.Generator().manual_seed(0)
    deltas = {w: {"w": torch.randn(4000, generator=g) * (0.02 if w != "w1" else 1.0),  # w1's is clipped
                  "b": torch.randn(3, generator=g), "n": torch.tensor(3)} for w in HONEST}
    samples = {w: 50 + 30 * i for i, w in enumerate(HONEST)}

    # the bad ones: a keys file not signed by mallory's key, and one of round 2 under w5's name
    forged = SecaggKeys(FORMAT_VERSION, 1, "mallory", *RoundSecrets.generate().publics())
    forged.signature = load_identity(tmp_path / "other.pem")[0].sign(keys_message(run_id, forged))
    write_yaml(s.path(names.secagg_keys(1, "mallory")), to_dict(forged))
    replayed = SecaggKeys(FORMAT_VERSION, 2, "w5", *RoundSecrets.generate().publics())
    replayed.signature = worker_identity("w5").sign(keys_message(run_id, replayed))
    write_yaml(s.path(names.secagg_keys(1, "w5")), to_dict(replayed))

    closing, tampered = None, False
    for _ in range(500):
        for w, sw in workers.items():
            sw.advance(1, a)
            if w == "w4" and s.exists(names.secagg_shares(1, "w4")) and not tampered:  # w0's envelope: to a stranger
                record = s.read_record(SecaggShares, names.secagg_shares(1, "w4"))
                stranger = RoundSecrets.generate()
                record.envelopes["w0"] = base64.b64encode(seal_envelope(bytes(132), stranger.c, stranger.c.public_key(),
                                                                        run_id, 1, "w4", "w0")).decode()
                record.signature = worker_identity("w4").sign(shares_message(run_id, record))
                write_yaml(s.path(names.secagg_shares(1, "w4")), to_dict(record))
                tampered = True
            if sw.may_train(1) and not s.exists(s.update_marker(1, w)):
                if w == "w3":  # a masked input one word short
                    _marker(s, a, w, {"masked": torch.zeros(length(layout_of(BASE)) - 1, dtype=torch.int32)}, 80)
                else:
                    masked, _ = sw.masked_input(1, a, deltas[w], layout_of(BASE), samples[w])
                    _marker(s, a, w, masked, samples[w])
        closing = secure.advance(set(assigned), optimizer, {})
        if closing is not None:
            break
    assert closing is not None and not closing.reason.startswith("redone"), (closing, said)
    rejected = {x.worker: x.reason for x in closing.rejected}
    assert rejected == {"mallory": "secure_step", "w5": "secure_step", "w3": "wrong_shape"}, closing.rejected
    survivors = ["w0", "w1", "w2", "w4"]
    assert sorted(x.worker for x in closing.accepted) == survivors
    enc = Encoding(5.0, 200, 5)
    clipped = {w: flatten(deltas[w], layout_of(BASE), 5.0)[0] for w in survivors}
    assert np.linalg.norm(clipped["w1"][:-1]) <= 5.0 + 1e-9  # w1's was longer: clipped on its worker
    weight = sum(samples[w] for w in survivors)
    expected = sum(clipped[w][:-1] * samples[w] for w in survivors) / weight
    got = np.concatenate([closing.new_state["b"].double().numpy(), closing.new_state["w"].double().numpy()])
    assert np.abs(got - expected).max() <= 2 * enc.error_bound() / weight + 1e-6
    assert int(closing.new_state["n"]) == 3  # batch counts: the median of the survivors' steps
    revealed = s.read_yaml(names.secagg_reveal(1, "w0"))["shares"]
    assert "w4" not in revealed and revealed["w3"].startswith("pair:")  # no share from a sealed-shut envelope


def test_too_few_holders_left_to_unmask_redo_the_round_with_its_model_unchanged(tmp_path: Path) -> None:
    """Five workers mask; three stop before revealing: two reveals are fewer than any secret's threshold (3), so
    after the step's deadline the round is redone, said in one line, and nothing is unmasked."""
    s, a, secure, workers, said = _open(tmp_path, HONEST, 4.0)
    closing = None
    for _ in range(2000):
        for w, sw in workers.items():
            if s.exists(names.secagg_roster(1, 3)) and w in ("w2", "w3", "w4"):
                continue  # gone after masking
            sw.advance(1, a)
            if sw.may_train(1) and not s.exists(s.update_marker(1, w)):
                _marker(s, a, w, sw.masked_input(1, a, {"w": torch.ones(4000), "b": torch.ones(3),
                                                        "n": torch.tensor(1)}, layout_of(BASE), 100)[0], 100)
        closing = secure.advance(set(HONEST), make_optimizer(ServerSettings("none"), frozenset({"w", "b"})), {})
        if closing is not None:
            break
        time.sleep(0.005)
    assert closing is not None and closing.reason.startswith("redone: only 2 share(s) of"), closing
    assert closing.accepted == [] and all(torch.equal(closing.new_state[k], BASE[k]) for k in BASE)
    assert any("the round is redone, its model unchanged" in line for line in said), said
