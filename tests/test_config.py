"""Config loading: built-ins, user files, overrides, and a share that keeps its config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedsync.base.errors import ConfigError
from fedsync.run.config import differences, load_config, parse_overrides
from fedsync.run.start import open_run
from fedsync.storage.share import Share

from .helpers import coordinator_identity


def test_builtin_configs_and_overrides() -> None:
    digits = load_config("digits")
    assert digits.task == "digits" and digits.quorum == 1.0
    cifar = load_config("cifar10", parse_overrides(["quorum=2", "data_root=/data"]))
    assert cifar.model == "resnet18_cifar" and cifar.quorum == 2 and cifar.data_root == "/data"
    assert differences(digits, digits) == [] and any("task" in d for d in differences(digits, cifar))


def test_user_file_overlays_the_defaults(tmp_path: Path) -> None:
    f = tmp_path / "mine.yaml"
    f.write_text("local_epochs: 5\npartition: dirichlet\n")
    cfg = load_config(str(f))
    assert cfg.local_epochs == 5 and cfg.partition == "dirichlet" and cfg.batch_size == 32


@pytest.mark.parametrize("pair, words", [
    ("quorum=1.5", "quorum"), ("quorum=0", "quorum"), ("lr=-1", "lr"), ("partition=sorted", "partition"),
    ("local_epochs=two", "local_epochs"), ("heartbeat=20", "worker_timeout"), ("nope=1", "unknown key")])
def test_bad_configs_are_refused_with_the_key(pair: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config("digits", parse_overrides([pair]))


def test_a_share_keeps_its_config(tmp_path: Path) -> None:
    share = Share(tmp_path)
    first = open_run(share, load_config("digits"), "coordinator", coordinator_identity())
    assert open_run(share, load_config("digits"), "coordinator", coordinator_identity()).run_id == first.run_id
    with pytest.raises(ConfigError, match="seed"):
        open_run(share, load_config("digits", {"seed": 7}), "coordinator", coordinator_identity())


@pytest.mark.processes
def test_commands_that_only_read_the_share_never_import_torch() -> None:
    """status, verify and --help answer in a fraction of a second: torch alone takes seconds to import."""
    code = ("import sys, fedsync.cli.main, fedsync.cli.status, fedsync.cli.watch, fedsync.run.inspecting.checks, "
            "fedsync.run.inspecting.status, fedsync.run.coordinating.report; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_where_a_machine_keeps_its_data_is_not_part_of_the_run() -> None:
    a, b = load_config("cifar10", {"data_root": "/Users/me/data"}), load_config("cifar10", {"data_root": "/home/me"})
    assert differences(a, b) == []
    assert differences(a, load_config("cifar10", {"data_root": "/home/me", "seed": 7})) == [
        "seed: 0 in the share, 7 now"]


def test_secure_aggregation_turns_off_what_needs_each_update_and_refuses_what_cannot_work() -> None:
    cfg = load_config("digits", {"secure_aggregation": True, "clip_norm": 5})
    assert (cfg.screen_factor, cfg.screen_max_ratio, cfg.clip_factor, cfg.screen_direction, cfg.late_policy,
            cfg.min_updates) == (0, 0, 0, False, "drop", 2)
    with pytest.raises(ConfigError, match="secure_aggregation clips each update on its worker: set clip_norm"):
        load_config("digits", {"secure_aggregation": True})
    refused = {"aggregation": ("median", "aggregation median needs each update on its own"),
               "screen_factor": (3.0, "cannot screen it: set screen_factor=0"),
               "screen_direction": (True, "screen_direction=false"),
               "late_policy": ("fold", "set late_policy=drop"),
               "compression": ("int8", "set compression=none"),
               "min_updates": (1, "min_updates of 2 or more")}
    for key, (value, words) in refused.items():
        with pytest.raises(ConfigError, match=words):
            load_config("digits", {"secure_aggregation": True, "clip_norm": 5, key: value})
