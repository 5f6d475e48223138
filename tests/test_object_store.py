"""A share in an object store (docs/PROTOCOL.md section 4, "On an object store"), against a real S3-compatible
server on 127.0.0.1: the Store operations, and a whole run of real fedsync processes through it (a coordinator
killed and restarted, a bad update, an inference job on the serving workers, `fedsync verify`)."""

from __future__ import annotations

import csv
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import save_file

from fedsync.base.errors import ShareError
from fedsync.learning.data import load_digits
from fedsync.storage.hashing import hash_bytes
from fedsync.storage.keys import coordinator_key_path, sealing_key_path
from fedsync.storage.lease import Lease, read_lease
from fedsync.storage.markers import FORMAT_VERSION, Assignment, CoordinatorLease, FinalMarker, Summary, parse, to_dict
from fedsync.storage.share import Share
from fedsync.storage.store import OversizeError, WriteConflict, read_upto
from fedsync.storage.yamlfile import dump_yaml
from tests.helpers import (
    assert_sealed,
    finish,
    killed_on_error,
    register_worker,
    run,
    start,
    submit_update,
    wait_until,
)
from tests.ports import free_port
from tests.s3 import S3Server, use_in_this_process

pytestmark = pytest.mark.processes  # real servers and fedsync processes


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    saved = dict(os.environ)
    with S3Server() as server:
        use_in_this_process(server)
        yield server
    os.environ.clear()
    os.environ.update(saved)


def test_the_store_operations_on_a_real_s3_server(s3: S3Server) -> None:
    share = Share(s3.url("ops"))
    store = share.store
    assert store.list("") == [] and store.signature("a/b.yaml") is None and not store.exists("a/b.yaml")
    store.write("0001/updates/w1.yaml", b"one")
    store.write("0001/global.safetensors", b"model")
    store.make_folder("0002")  # nothing to do on a store: a folder is the prefix of its objects
    assert {(e.name, e.folder) for e in store.list("")} == {("0001", True)}
    assert {(e.name, e.folder) for e in store.list("0001")} == {("updates", True), ("global.safetensors", False)}
    first = store.signature("0001/updates/w1.yaml")
    store.write("0001/updates/w1.yaml", b"two")  # a heartbeat rewrites its object: the signature must move
    assert store.signature("0001/updates/w1.yaml") not in (None, first)
    assert store.read("0001/updates/w1.yaml", 10) == b"two"
    with pytest.raises(OversizeError, match="over the 2-byte limit"):
        store.read("0001/updates/w1.yaml", 2)
    with pytest.raises(FileNotFoundError):
        store.read("0001/none.yaml", 10)
    store.remove("0001")
    assert store.list("") == [] and not store.exists("0001/global.safetensors")


def test_a_large_object_goes_up_in_parts_and_reads_back_in_pieces_and_seeks(s3: S3Server) -> None:
    store = Share(s3.url("big")).store
    data = os.urandom(13 << 20)  # over obstore's 5 MiB part size: a multipart upload
    store.write("u.safetensors", data)
    etag, size = store.signature("u.safetensors")
    assert size == len(data) and etag.rstrip('"').endswith("-3")  # S3's ETag of a 3-part upload
    with store.open("u.safetensors") as f:
        assert f.size == len(data)
        buf = bytearray(len(data))
        assert read_upto(f, memoryview(buf)[: 5 << 20]) == 5 << 20
        assert read_upto(f, memoryview(buf)[5 << 20:]) == len(data) - (5 << 20)
        assert hash_bytes(bytes(buf)) == hash_bytes(data)
        f.seek(9 << 20)  # a coordinate-wise rule reads slices out of order
        piece = bytearray(1000)
        assert read_upto(f, memoryview(piece)) == 1000 and bytes(piece) == data[9 << 20: (9 << 20) + 1000]
        f.seek(17)
        assert read_upto(f, memoryview(piece)) == 1000 and bytes(piece) == data[17:1017]


def test_an_object_replaced_while_it_is_read_fails_the_read_instead_of_mixing_versions(s3: S3Server) -> None:
    store = Share(s3.url("replaced")).store
    store.write("u.safetensors", b"a" * 100)
    with store.open("u.safetensors") as f:
        store.write("u.safetensors", b"b" * 100)
        with pytest.raises(OSError, match="PreconditionError"):
            read_upto(f, memoryview(bytearray(100)))


def _lease_of(host: str) -> bytes:
    return dump_yaml(to_dict(CoordinatorLease(format=FORMAT_VERSION, run_id="x", owner=f"{host}:1:abcd", host=host,
                                              pid=1, heartbeat=1, state="collecting", round=1, note="")))


def test_the_lease_on_a_store_is_written_only_over_the_version_last_seen(s3: S3Server) -> None:
    share = Share(s3.url("lease"))
    share.start({"format": FORMAT_VERSION})
    with pytest.raises(WriteConflict):
        share.write_if(share.lease, b"x", ("\"not-its-etag\"", 1))
    share.store.write(share.lease, _lease_of("dead-host"))  # a coordinator that stopped refreshing
    a, b = (Lease(share, "x", refresh=0.1, timeout=0.3, log=lambda line: None) for _ in range(2))
    a.check()
    b.check()  # both watched the dead lease run out, and both take over: one wins
    a.acquire()
    try:
        with pytest.raises(ShareError, match="took the lease .* while this one looked at it"):
            b.acquire()
        assert read_lease(share).owner == a.record.owner
        share.store.write(share.lease, _lease_of("new-host"))  # a was presumed dead and taken over
        wait_until(a.lost.is_set, 10, "the old owner to notice it lost the lease")
        assert read_lease(share).host == "new-host"  # the old owner wrote nothing over it
    finally:
        a.release()
    assert read_lease(share).host == "new-host"


def test_an_unreachable_store_and_events_on_a_store_are_one_line_errors(s3: S3Server) -> None:
    nobody = {**s3.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    out = run("status", "--share", s3.url("run"), env=nobody, timeout=60)
    assert out.returncode == 5 and "fedsync: error:" in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = run("status", "--share", "s3://fedsync-no-such-bucket/run", env=s3.env, timeout=60)
    assert out.returncode == 5 and "404" in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = run("worker", "--share", s3.url("run"), "--watch", "events", "--wait-for-run", "1", env=s3.env,
              timeout=60)
    assert out.returncode == 3 and "is an object store, which only listing sees" in out.stderr, out.stderr


def test_a_run_through_the_object_store_survives_a_killed_coordinator_and_a_bad_update_then_serves_a_job(
        s3: S3Server, tmp_path: Path) -> None:
    url = s3.url("run")
    share = Share(url)
    coord_args = ["coordinator", "--share", url, "--rounds", "3", "--set", "min_workers=3", "--set", "quorum=2",
                  "--set", "worker_timeout=120"]
    register_worker(share, "bad")  # the test's own worker: it is assigned a shard and sends damage in round 2
    coord = start(*coord_args, fault="coordinator:after-summary:1", env=s3.env)
    workers = [start("worker", "--share", url, "--name", w, "--device", "cpu", "--serve", env=s3.env)
               for w in ("w1", "w2")]
    with killed_on_error(coord, *workers):
        out = finish(coord, timeout=120)
        assert coord.returncode == -signal.SIGKILL, out  # killed right after round 1's summary
        assert share.exists(share.summary(1)) and not share.exists(share.summary(2)), out
        coord = start(*coord_args, env=s3.env)
        wait_until(lambda: share.exists(share.assignment(2)), 60, "round 2 to open after the restart")
        a2 = parse(Assignment, share.read_yaml(share.assignment(2)), "assignment")
        assert "bad" in a2.workers
        ref = submit_update(share, a2, "bad", {}, samples=10)  # a marker for an update that is not the model's
        assert ref.bytes > 0
        out = finish(coord, timeout=120)
        test = load_digits(0, 0.2).test  # the serving workers predict 40 test digits through the store
        save_file({"x": test.x[:40].contiguous()}, str(tmp_path / "digits.safetensors"))
        job = run("infer", "--share", url, "--inputs", str(tmp_path / "digits.safetensors"), "--out",
                  str(tmp_path / "preds.csv"), "--chunk-rows", "10", env=s3.env, timeout=120)
        for w in workers:
            w.terminate()  # SIGTERM: they leave as on Ctrl-C
        out += job.stdout + job.stderr + "".join(finish(w, timeout=60) for w in workers)
    assert coord.returncode == 0 and job.returncode == 0 and "Traceback" not in out, out
    with open(tmp_path / "preds.csv", newline="") as f:
        predicted = [int(r["class"]) for r in csv.DictReader(f)]
    assert len(predicted) == 40 and sum(p == int(y) for p, y in zip(predicted, test.y)) >= 36, predicted
    final = parse(FinalMarker, share.read_yaml(share.final_marker), "final")
    assert final.round == 3 and final.test_accuracy > 0.9, final
    s2 = parse(Summary, share.read_yaml(share.summary(2)), "summary")
    assert [(x.worker, x.reason) for x in s2.rejected] == [("bad", "missing_tensor")], s2.rejected
    assert sorted(x.worker for x in s2.accepted) == ["w1", "w2"]
    for r in (1, 2, 3):
        assert_sealed(share, r, ["w1", "w2"])  # a bucket reader sees ciphertext only
    key = str(sealing_key_path(coordinator_key_path()))
    checked = run("verify", "--share", url, "--key", key, env=s3.env, timeout=60)
    assert checked.returncode == 0 and "0 error(s)" in checked.stdout, checked.stdout + checked.stderr
    # a person (or a damaged sync) changes an accepted update: verify names it
    share.store.write(share.update_tensors(1, "w1", sealed=True), b"not the update")
    checked = run("verify", "--share", url, env=s3.env, timeout=60)
    assert checked.returncode == 8 and "0001/updates/w1.safetensors.age" in checked.stdout, checked.stdout


def test_the_roles_do_not_poll_a_store_between_their_rescans_and_status_watch_does(s3: S3Server) -> None:
    from fedsync.storage.watch import ShareWatcher

    share = Share(s3.url("watch"))
    with ShareWatcher(share, list_store=False) as quiet:
        assert quiet.mode == "rescan" and quiet.poller is None and quiet.observer is None
        share.store.write("workers/w1.yaml", b"x")
        assert quiet.wait(0.3) is False  # nothing listens: the caller's own rescan looks
    with ShareWatcher(share, poll_interval=0.1) as polling:
        assert polling.mode == "poll" and "object store" in polling.describe
        share.store.write("workers/w1.yaml", b"y")
        assert polling.wait(5) is True
