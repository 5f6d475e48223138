"""Where a run starts and ends: fedsync.yaml (start one in an empty share, or join it) and final.yaml."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from fedsync.run.config import RunConfig, config_from_dict, differences
from fedsync.base.errors import ConfigError, FormatError, ShareError
from fedsync.storage.markers import FORMAT_VERSION, FinalMarker, FormatMismatch, Manifest, MarkerError, parse, to_dict
from fedsync.storage.share import Share, read_yaml, write_yaml


def check_run(share: Share, config: RunConfig) -> Manifest | None:
    """The run in the share, if its config is `config`; None for an empty share; otherwise refuse. Reads only,
    so a refused start leaves the share as it was."""
    if share.manifest.exists():
        manifest = read_manifest(share)
        stored = config_from_dict(manifest.config, f"{share.manifest}")
        changed = differences(stored, config)
        if changed:
            raise ConfigError(f"{share.root} already holds run {manifest.run_id} with another config ("
                              + "; ".join(changed) + "): use the same config to continue it, or another --share")
        return manifest
    if share.rounds():
        raise ShareError(f"{share.root} holds round folders but no fedsync.yaml: it is damaged or not a fedsync "
                         "share; point --share at an empty folder")
    return None


def new_manifest(config: RunConfig, created_by: str) -> Manifest:
    now = datetime.now(timezone.utc)
    return Manifest(format=FORMAT_VERSION, run_id=f"{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}",
                    created=now.isoformat(timespec="seconds"), created_by=created_by, config=config.as_dict())


def write_manifest(share: Share, manifest: Manifest) -> Manifest:
    """Start the run: create the share folder if needed and write fedsync.yaml, once."""
    share.root.mkdir(parents=True, exist_ok=True)
    write_yaml(share.manifest, to_dict(manifest))
    return manifest


def open_run(share: Share, config: RunConfig, created_by: str) -> Manifest:
    """Continue the run in the share if its config is the same; start one if the share is empty."""
    return check_run(share, config) or write_manifest(share, new_manifest(config, created_by))


def read_manifest(share: Share) -> Manifest:
    try:
        return parse(Manifest, read_yaml(share.manifest), str(share.manifest))
    except FormatMismatch as e:
        raise FormatError(str(e)) from None
    except (MarkerError, ValueError, OSError) as e:
        raise ShareError(f"{share.manifest} is unreadable: {e}") from None


def finished(share: Share, run_id: str) -> FinalMarker | None:
    """final.yaml, if it names this run and a round at least as new as the newest round folder (PROTOCOL 7.4)."""
    try:
        final = parse(FinalMarker, read_yaml(share.final_marker), "final.yaml")
    except Exception:  # noqa: BLE001 - absent or not synced whole yet: the run is not over
        return None
    rounds = share.rounds()
    newest = rounds[-1] if rounds else 0
    return final if final.run_id == run_id and final.round >= newest else None
