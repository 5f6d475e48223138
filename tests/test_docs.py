"""The documents and the code agree: examples parse, and every reason, key and exit status is documented."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits as load_digits_raw

from fedsync.base.errors import EXIT_CODES
from fedsync.learning.data import load_digits
from fedsync.learning.partition import partition
from fedsync.learning.tasks import get_task
from fedsync.run.config import RunConfig, load_config
from fedsync.run.start import task_record
from fedsync.storage.hashing import hash_bytes
from fedsync.storage.markers import (
    Assignment,
    CoordinatorLease,
    Evaluation,
    FinalMarker,
    JobMarker,
    JobPlan,
    Manifest,
    OutputMarker,
    Summary,
    TrustList,
    UpdateMarker,
    WorkerInfo,
    parse,
    to_dict,
)
from fedsync.storage.reasons import Reason
from fedsync.storage.secagg_files import SecaggKeys, SecaggReveal, SecaggRoster, SecaggShares
from fedsync.storage.signing import (
    assignment_message,
    final_message,
    recipient_message,
    trust_message,
    update_message,
    verify,
)
from fedsync.storage.yamlfile import parse_yaml
from fedsync.tensors.files import state_bytes

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = (ROOT / "docs" / "PROTOCOL.md").read_text()
README = (ROOT / "README.md").read_text()
RECORDS = {"fedsync.yaml": Manifest, "coordinator.yaml": CoordinatorLease, "workers/<name>.yaml": WorkerInfo,
           "assignment.yaml": Assignment,
           "updates/<name>.yaml": UpdateMarker, "summary.yaml": Summary, "final.yaml": FinalMarker,
           "trust.yaml": TrustList, "evaluation.yaml": Evaluation, "jobs/<job>/job.yaml": JobMarker,
           "jobs/<job>/plan.yaml": JobPlan, "jobs/<job>/outputs/<chunk>.<worker>.yaml": OutputMarker,
           "secagg/keys/<name>.yaml": SecaggKeys, "secagg/roster-1.yaml": SecaggRoster,
           "secagg/shares/<name>.yaml": SecaggShares, "secagg/reveal/<name>.yaml": SecaggReveal}


def _examples() -> dict[str, str]:
    blocks = re.findall(r"```yaml\n# file: (\S+)\n(.*?)```", PROTOCOL, re.S)
    return dict(blocks)


def test_every_share_file_has_an_example() -> None:
    assert set(_examples()) == set(RECORDS)


@pytest.mark.parametrize("name", list(RECORDS))
def test_protocol_examples_parse_and_cover_every_key(name: str) -> None:
    data = parse_yaml(_examples()[name].encode())
    record = parse(RECORDS[name], data, name)
    assert set(to_dict(record)) == set(data), "the example shows exactly the keys fedsync writes"


def test_the_examples_signatures_verify_as_section_5_10_says() -> None:
    """Someone implementing the protocol from the document alone can check their signing against it."""
    ex = {name: parse(cls, parse_yaml(_examples()[name].encode()), name) for name, cls in RECORDS.items()}
    manifest, trust = ex["fedsync.yaml"], ex["trust.yaml"]
    coordinator = manifest.coordinator_key
    assert read_trust_entries(trust, coordinator) == {n: (e.key, e.state) for n, e in trust.workers.items()}
    assert verify(coordinator, assignment_message(ex["assignment.yaml"]), ex["assignment.yaml"].signature)
    assert verify(coordinator, final_message(ex["final.yaml"]), ex["final.yaml"].signature)
    assert verify(coordinator, recipient_message(manifest.run_id, manifest.recipient), manifest.recipient_signature)
    marker = ex["updates/<name>.yaml"]
    message = update_message(manifest.run_id, marker)
    assert verify(trust.workers[marker.worker].key, message, marker.signature)
    assert f"```\n{message.decode()}```" in PROTOCOL  # the message written out in section 5.10 is this one
    assert not verify(trust.workers["gtx1080-box"].key, message, marker.signature)  # another worker's key


def test_the_example_task_record_is_the_digits_task_as_section_5_1_computes_it() -> None:
    manifest = parse(Manifest, parse_yaml(_examples()["fedsync.yaml"].encode()), "fedsync.yaml")
    cfg = load_config("digits")
    assert manifest.task == task_record(cfg)
    state = get_task("digits").build_model(cfg.model).state_dict()
    lines = "".join(f"{k} {str(v.dtype).removeprefix('torch.')} {list(v.shape)}\n" for k, v in sorted(state.items()))
    assert "0.weight float32 [32, 1, 3, 3]\n" in lines and "1.num_batches_tracked int64 []\n" in lines
    assert hash_bytes(lines.encode()) == manifest.task.layout  # the lines as the section spells them


def test_the_example_shard_list_is_the_one_the_coordinator_writes_for_digits_cut_three_ways() -> None:
    """An implementer can check a shard list against the document: the example assignment's `shards` is digits'
    list for 3 shards (seed 0, iid), and every index is a row of load_digits()'s own order outside the test set."""
    a = parse(Assignment, parse_yaml(_examples()["assignment.yaml"].encode()), "assignment.yaml")
    ds = load_digits(0, 0.2)
    parts = partition(ds.train.y.numpy(), a.num_shards, "iid", 0, 0.5)
    lists = {str(i): torch.as_tensor(ds.canonical()[p], dtype=torch.int64) for i, p in enumerate(parts)}
    data = state_bytes(lists)
    assert (a.shards.file, a.shards.blake3, a.shards.bytes) == ("shards/003.safetensors", hash_bytes(data), len(data))
    x, _ = load_digits_raw(return_X_y=True)
    for i, p in enumerate(parts):  # the listed rows of the raw data are the shard's examples
        assert torch.equal(torch.as_tensor(x[lists[str(i)].numpy()] / 16, dtype=torch.float32).reshape(-1, 1, 8, 8),
                           ds.train.x[p])


def read_trust_entries(trust: TrustList, coordinator: str) -> dict[str, tuple[str, str]]:
    entries = {n: (e.key, e.state) for n, e in trust.workers.items()}
    assert verify(coordinator, trust_message(trust.run_id, entries), trust.signature)
    return entries


def test_manifest_example_holds_a_valid_config() -> None:
    data = parse_yaml(_examples()["fedsync.yaml"].encode())
    assert set(data["config"]) == {f.name for f in dataclasses.fields(RunConfig)}


def test_every_reason_is_documented_with_help() -> None:
    for reason in Reason:
        assert reason.help
        row = re.search(rf"^\| {reason.value} \| (yes|no) \|", PROTOCOL, re.M)
        assert row, f"{reason.value} missing from PROTOCOL.md section 7"
        assert (row.group(1) == "yes") == reason.waits, reason


def test_every_config_key_is_in_the_readme_with_its_default() -> None:
    defaults = load_config("digits").as_dict()
    for key, value in defaults.items():
        row = re.search(rf"^\| {key} \| ([^|]+) \|", README, re.M)
        assert row, f"config key {key} missing from README.md"
        shown = row.group(1).strip()
        assert shown in (str(value), "null" if value is None else "", str(value).lower(),
                         str(int(value)) if isinstance(value, float) and value.is_integer() else ""), key


def test_every_exit_status_is_in_the_readme() -> None:
    for code in EXIT_CODES:
        assert re.search(rf"^\| {code} \|", README, re.M), code


def test_the_syncthing_guide_exists_and_is_linked() -> None:
    guide = ROOT / "scripts" / "setup_syncthing.md"
    assert guide.is_file() and "scripts/setup_syncthing.md" in README
    text = guide.read_text()
    for must in ("fsWatcherDelayS", ".stignore", ".*.tmp", "Tailscale", "sees nothing", "--syncthing"):
        assert must in text, must


def test_readme_opens_with_the_two_commands() -> None:
    head = README.split("## Running across machines")[0]
    assert "make demo" in head and "make test" in head
    assert "make test" in (ROOT / ".ci" / "run").read_text()
