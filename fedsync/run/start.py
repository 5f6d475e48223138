"""Whether a coordinator may start or continue the run in a share: checks that only read, so a refused start
leaves the share as it was (docs/PROTOCOL.md section 6, step 1)."""

from __future__ import annotations

from fedsync.aggregation.privacy.accounting import Release, epsilon
from fedsync.base.errors import ConfigError, ShareError, TrustError
from fedsync.learning.models import data_buffers
from fedsync.run.config import RunConfig, config_from_dict, differences
from fedsync.storage.hashing import hash_bytes
from fedsync.storage.keys import Identity, load_sealing_identity, sealing_key_path
from fedsync.storage.manifest import new_manifest, read_manifest, write_manifest
from fedsync.storage.markers import Manifest, TaskRecord
from fedsync.storage.sealing import SealingIdentity
from fedsync.storage.share import Share


def task_record(config: RunConfig) -> TaskRecord:
    """The run's task as this machine has it installed: its version and its model's layout, the BLAKE3 of one line
    `name dtype shape` per tensor of the model's state, sorted by name (docs/PROTOCOL.md section 5.1)."""
    task = config.resolved_task()
    state = task.build_model(config.model).state_dict()
    lines = "".join(f"{k} {str(v.dtype).removeprefix('torch.')} {list(v.shape)}\n" for k, v in sorted(state.items()))
    return TaskRecord(name=config.task, version=task.version, layout=hash_bytes(lines.encode()),
                      base=task.base_digest() if task.base_digest else None)


def check_task(manifest: Manifest, config: RunConfig) -> TaskRecord:
    """Refuse, before anything is trained or written, a machine whose task is not the run's: another version of
    the task, or a model of another layout or base, would train something the others do not. This machine's
    record, which matches the run's."""
    mine = task_record(config)
    if manifest.task is None:
        return mine  # a run from before task records: nothing to compare
    if mine.base != manifest.task.base and mine.layout == manifest.task.layout:
        raise ConfigError(f"the base model at {config.base_model} is not run {manifest.run_id}'s: its weights hash to "
                          f"{(mine.base or '-')[:12]}, the run's base to {(manifest.task.base or '-')[:12]} (docs/"
                          "PROTOCOL.md section 5.1): give this machine a copy of the run's base model folder")
    if mine != manifest.task:
        what = ("its model's layout" if mine.version == manifest.task.version else
                f"version {mine.version!r} against the run's {manifest.task.version!r}")
        raise ConfigError(f"task {config.task!r} on this machine differs from run {manifest.run_id}'s ({what}; layout "
                          f"{mine.layout[:12]} against {manifest.task.layout[:12]}): install the task the run was "
                          "started with on this machine")
    return mine


def check_privacy(config: RunConfig) -> None:
    """Refuse differential privacy that could not hold: a model with statistics of the data in its buffers
    (BatchNorm), or a target_epsilon that one round alone would spend (every enrolled worker assigned)."""
    if config.dp is None and config.worker_dp is None:
        return
    buffers = data_buffers(config.resolved_task().build_model(config.model))
    if buffers:
        raise ConfigError(f"model {config.model} keeps statistics of the data in buffers ({', '.join(buffers[:3])}"
                          f"{', ...' if len(buffers) > 3 else ''}: BatchNorm), which no noise would cover, and Opacus "
                          "refuses it: use a model with GroupNorm instead (digits: model=digits_cnn_gn)")
    dp = config.dp
    if dp is not None and dp.target_epsilon is not None:
        one = epsilon([Release(1.0, dp.noise_multiplier)], dp.delta)
        if one > dp.target_epsilon:
            raise ConfigError(f"dp.target_epsilon {dp.target_epsilon:g} is spent by the first round alone (epsilon "
                              f"{one:.3f} at noise_multiplier {dp.noise_multiplier:g}, delta {dp.delta:g}, every "
                              "worker assigned): raise noise_multiplier or target_epsilon")


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


def sealing_key(config: RunConfig, signing: Identity, existing: Manifest | None) -> tuple[SealingIdentity | None, bool]:
    """The key that opens the run's sealed updates, an age identity beside the coordinator's signing key (created
    for a new run); None when the run keeps plain updates. Whether it was created now. Refuses a key that is not
    the one the run's workers seal to (docs/PROTOCOL.md section 5.15)."""
    if not config.confidential_updates:
        return None, False
    path = sealing_key_path(signing.path)
    if existing is not None and existing.recipient is None:
        raise ShareError(f"fedsync.yaml of run {existing.run_id} keeps updates confidential but names no recipient "
                         "to seal them to: it is damaged")
    opener, created = load_sealing_identity(path, create=existing is None, absent=(
        f"run {existing.run_id if existing else ''} seals its updates to {existing.recipient if existing else ''}; "
        "copy the key that opens them here from the machine that started the run"))
    if existing is not None and existing.recipient != opener.recipient:
        raise TrustError(f"run {existing.run_id} seals its updates to {existing.recipient}, but {path} opens "
                         f"{opener.recipient}: run the coordinator with the key the run was started with")
    return opener, created


def open_run(share: Share, config: RunConfig, created_by: str, signing: Identity) -> Manifest:
    """Continue the run in the share if its config is the same; start one, signed for by `signing`, if the share is
    empty."""
    existing = check_run(share, config)
    if existing is not None:
        return existing
    opener, _ = sealing_key(config, signing, None)
    return write_manifest(share, new_manifest(config.as_dict(), created_by, signing, task_record(config),
                                              opener.recipient if opener else None))

