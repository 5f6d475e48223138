"""Whether a coordinator may start or continue the run in a share: checks that only read, so a refused start
leaves the share as it was (docs/PROTOCOL.md section 6, step 1)."""

from __future__ import annotations

from fedsync.base.errors import ConfigError, ShareError
from fedsync.run.config import RunConfig, config_from_dict, differences
from fedsync.storage.hashing import hash_bytes
from fedsync.storage.manifest import new_manifest, read_manifest, write_manifest
from fedsync.storage.markers import Manifest, TaskRecord
from fedsync.storage.share import Share


def task_record(config: RunConfig) -> TaskRecord:
    """The run's task as this machine has it installed: its version and its model's layout, the BLAKE3 of one line
    `name dtype shape` per tensor of the model's state, sorted by name (docs/PROTOCOL.md section 5.1)."""
    task = config.resolved_task()
    state = task.build_model(config.model).state_dict()
    lines = "".join(f"{k} {str(v.dtype).removeprefix('torch.')} {list(v.shape)}\n" for k, v in sorted(state.items()))
    return TaskRecord(name=config.task, version=task.version, layout=hash_bytes(lines.encode()))


def check_task(manifest: Manifest, config: RunConfig) -> None:
    """Refuse, before anything is trained or written, a machine whose task is not the run's: another version of
    the task, or a model of another layout, would train something the others do not."""
    if manifest.task is None:
        return  # a run from before task records: nothing to compare
    mine = task_record(config)
    if mine != manifest.task:
        what = ("its model's layout" if mine.version == manifest.task.version else
                f"version {mine.version!r} against the run's {manifest.task.version!r}")
        raise ConfigError(f"task {config.task!r} on this machine differs from run {manifest.run_id}'s ({what}; layout "
                          f"{mine.layout[:12]} against {manifest.task.layout[:12]}): install the task the run was "
                          "started with on this machine")


def check_run(share: Share, config: RunConfig) -> Manifest | None:
    """The run in the share, if its config is `config` and this machine has its task; None for an empty share;
    otherwise refuse. Reads only, so a refused start leaves the share as it was."""
    if share.exists(share.manifest):
        manifest = read_manifest(share)
        stored = config_from_dict(manifest.config, share.where(share.manifest))
        changed = differences(stored, config)
        if changed:
            raise ConfigError(f"{share.where()} already holds run {manifest.run_id} with another config ("
                              + "; ".join(changed) + "): use the same config to continue it, or another --share")
        check_task(manifest, config)
        return manifest
    if share.rounds():
        raise ShareError(f"{share.where()} holds round folders but no fedsync.yaml: it is damaged or not a fedsync "
                         "share; point --share at an empty folder")
    return None


def open_run(share: Share, config: RunConfig, created_by: str, coordinator_key: str) -> Manifest:
    """Continue the run in the share if its config is the same; start one, signed for by `coordinator_key`, if the
    share is empty."""
    return check_run(share, config) or write_manifest(share, new_manifest(config.as_dict(), created_by,
                                                                          coordinator_key, task_record(config)))

