"""The options several commands share, each parsed once into what the roles take (--share into a Share)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedsync.base import defaults
from fedsync.storage.medium import WATCH_MODES, describe_modes
from fedsync.storage.share import Share


def _share(value: str | Share) -> Share:
    """--share, parsed once: every command and role receives the Share (an object store's URL keeps its '//')."""
    return value if isinstance(value, Share) else Share.parse(value)


ShareOpt = Annotated[Share, typer.Option(
    "--share", parser=_share,
    help="The shared folder (a local path, mount or synced folder), or an object store: s3://bucket/prefix "
         "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for R2, B2 or MinIO), gs://, az://.",
    metavar="DIR|URL")]
SyncthingOpt = Annotated[str | None, typer.Option(
    "--syncthing", help="URL of this machine's Syncthing API (e.g. http://127.0.0.1:8384) when SHARE is a "
                        "Syncthing folder: fedsync asks it to scan what it just wrote, saving the watcher delay "
                        "on every hop. Needs the API key.", metavar="URL")]
SyncthingKeyOpt = Annotated[str | None, typer.Option(
    "--syncthing-key", help="That Syncthing's API key (or set FEDSYNC_SYNCTHING_KEY).", metavar="KEY")]
WatchOpt = Annotated[str, typer.Option("--watch", help=describe_modes(), metavar="MODE")]
DataRootOpt = Annotated[str | None, typer.Option(
    "--data-root", "--data", help="Where the task's data is on this machine: the folder holding "
                                  "cifar-10-batches-py/, or for imagefolder this machine's own image folder "
                                  "(DIR/<class>/<image>: a worker's training images, the coordinator's test images). "
                                  "Default: the run config's data_root. Each machine gives its own.", metavar="DIR")]
BaseModelOpt = Annotated[str | None, typer.Option(
    "--base-model", help="causal_lm: this machine's copy of the base model's Hugging Face folder (config.json, "
                         "weights, tokenizer). Default: the run config's base_model. Each machine gives its own; its "
                         "weights must be the run's (checked by hash before anything is written).", metavar="DIR")]

LogJsonOpt = Annotated[bool, typer.Option("--log-json", help="Write one JSON object per event (time, role, level, "
                                                           "message) instead of a line of text, for log collectors; "
                                                           "no progress line.")]
KeyOpt = Annotated[Path | None, typer.Option(
    "--key", help="The private key (PEM, Ed25519, mode 0600): the coordinator and workers create theirs on first "
                  "start when absent; `trust` signs with the coordinator's. "
                  "Default: coordinator.pem or worker-NAME.pem in $FEDSYNC_KEY_DIR, else "
                  "$XDG_CONFIG_HOME/fedsync/keys, else ~/.config/fedsync/keys. Never put it in the share. Beside "
                  "the coordinator's lies the key that opens its run's sealed updates (the same name, .age).",
                  metavar="FILE")]


def check_watch(value: str) -> str:
    if value not in WATCH_MODES:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(WATCH_MODES)}")
    return value


def check_device(value: str) -> str:
    """--device's form, checked before anything starts: a misspelt device is bad usage, not an absent one."""
    if not defaults.DEVICE_SPEC.match(value):
        raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return value


def check_coordinator_key(value: str | None) -> str | None:
    """--coordinator-key: a public key, or bad usage said in one line (never a traceback)."""
    if value is None:
        return None
    from fedsync.storage.markers import MarkerError
    from fedsync.storage.signing import canonical_public

    try:
        return canonical_public(value)
    except MarkerError as e:
        raise typer.BadParameter(f"{e}: give the whole `ed25519:…` key the coordinator printed at its start") from None
