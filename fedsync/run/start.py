"""Whether a coordinator may start or continue the run in a share: checks that only read, so a refused start
leaves the share as it was (docs/PROTOCOL.md section 6, step 1)."""

from __future__ import annotations

from fedsync.base.errors import ConfigError, ShareError
from fedsync.run.config import RunConfig, config_from_dict, differences
from fedsync.storage.manifest import new_manifest, read_manifest, write_manifest
from fedsync.storage.markers import Manifest
from fedsync.storage.share import Share


def check_run(share: Share, config: RunConfig) -> Manifest | None:
    """The run in the share, if its config is `config`; None for an empty share; otherwise refuse. Reads only,
    so a refused start leaves the share as it was."""
    if share.exists(share.manifest):
        manifest = read_manifest(share)
        stored = config_from_dict(manifest.config, share.where(share.manifest))
        changed = differences(stored, config)
        if changed:
            raise ConfigError(f"{share.where()} already holds run {manifest.run_id} with another config ("
                              + "; ".join(changed) + "): use the same config to continue it, or another --share")
        return manifest
    if share.rounds():
        raise ShareError(f"{share.where()} holds round folders but no fedsync.yaml: it is damaged or not a fedsync "
                         "share; point --share at an empty folder")
    return None


def open_run(share: Share, config: RunConfig, created_by: str, coordinator_key: str) -> Manifest:
    """Continue the run in the share if its config is the same; start one, signed for by `coordinator_key`, if the
    share is empty."""
    return check_run(share, config) or write_manifest(share, new_manifest(config.as_dict(), created_by,
                                                                          coordinator_key))

