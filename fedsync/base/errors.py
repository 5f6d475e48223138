"""Errors a user can act on; the CLI turns each into one line and an exit status."""

from __future__ import annotations


class FedsyncError(Exception):
    """Base of every error that ends a command with a message instead of a traceback."""

    exit_code = 1


class UsageError(FedsyncError):
    """An argument names something that is not there (a worker, a round): bad command-line usage."""

    exit_code = 2


class ConfigError(FedsyncError):
    """The run's config is missing, malformed, or differs from the run already in the share."""

    exit_code = 3


class FormatError(FedsyncError):
    """The share was written by another format version of fedsync."""

    exit_code = 4


class ShareError(FedsyncError):
    """The share cannot be used: missing, not writable, or already driven by another process."""

    exit_code = 5


class DataError(FedsyncError):
    """A dataset is not where the config says, or is not in the expected format."""

    exit_code = 6


class DeviceError(FedsyncError):
    """The requested device is not present or cannot be driven by this torch build."""

    exit_code = 7


class RunStuck(FedsyncError):
    """A round cannot close: every live assigned worker's update was rejected; or the last round's model evaluates
    to a non-finite loss and is not signed as final (the message says why and what to change)."""

    exit_code = 9


class TrustError(FedsyncError):
    """A key does not match: this coordinator's key is not the one that started the run, the run's coordinator key
    differs from the one this worker pinned or was given, trust.yaml is not signed by the coordinator, or a key
    file is unusable."""

    exit_code = 10


class Stopped(KeyboardInterrupt):
    """SIGTERM (kill, systemd, a container's stop), raised where Ctrl-C raises KeyboardInterrupt, so every command
    stops as cleanly on either."""


def stopped_by(e: KeyboardInterrupt) -> str:
    """What stopped a process, in words for its last line and its lease."""
    return "SIGTERM" if isinstance(e, Stopped) else "Ctrl-C (SIGINT)"


def _said(cls: type[FedsyncError]) -> str:
    """An error class's first line, as `fedsync --help` lists it: in lower case like the others."""
    text = " ".join((cls.__doc__ or "").split())
    return text[:1].lower() + text[1:]


EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "unexpected error (a bug: please report it with the message)",
    2: "bad command-line usage: an option's value is malformed, or an argument names something that is not there",
    3: _said(ConfigError),
    4: _said(FormatError),
    5: _said(ShareError),
    6: _said(DataError),
    7: _said(DeviceError),
    8: "fedsync verify found damage: a file the run relies on is missing or differs from its marker",
    9: _said(RunStuck),
    10: _said(TrustError),
    130: "interrupted (Ctrl-C, or SIGTERM: the process stops as cleanly as on Ctrl-C)",
}
