"""Which way of noticing changes suits the share's medium: inotify events on local disks, polling where other
machines' writes never reach inotify (network and FUSE filesystems). Light on purpose: `--help` imports it."""

from __future__ import annotations

import os
from pathlib import Path

WATCH_MODES = ("auto", "events", "poll")
# Filesystems whose remote changes never reach inotify. "fuse." covers sshfs, rclone, smbnetfs and the like;
# "fuseblk" (ntfs-3g and other local block devices) does report local changes and is not listed.
POLLED_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre",
                      "davfs", "fuse")
POLL_INTERVAL_S = 1.0
# An object store bills each listing request, so it is polled half as often (docs/PROTOCOL.md section 4, "On an
# object store", says what one poll costs).
OBJECT_POLL_INTERVAL_S = 2.0


def filesystem_type(path: Path, mountinfo: str | None = None) -> str | None:
    """The type of the filesystem holding `path`, from /proc/self/mountinfo (None where there is none)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None  # not Linux: macOS and Windows report changes on every filesystem they mount alike
    target = os.path.realpath(path)
    best, best_type = "", None
    for line in mountinfo.splitlines():
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not rest:
            continue
        point = parts[4].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, rest.split()[0]
    return best_type


def describe_modes() -> str:
    """What --watch does, in the words `--help` prints (tests/test_cli.py holds it to choose_mode's behaviour)."""
    return (f"How to notice changes: {' | '.join(WATCH_MODES)}. events: inotify (local disks). poll: list the "
            f"share's active folders every {POLL_INTERVAL_S:g} s. auto: poll when the share is on "
            f"{', '.join(POLLED_FILESYSTEMS)} or fuse.* (sshfs, rclone) filesystems, where inotify never sees "
            f"another machine's writes; events otherwise. An object store (s3://) has no events: coordinator and "
            f"workers rescan it every 2 s, `status --watch` polls it every {OBJECT_POLL_INTERVAL_S:g} s.")


def choose_mode(requested: str, path: Path, mountinfo: str | None = None) -> tuple[str, str]:
    """(events | poll, why) for --watch; auto decides from the filesystem type."""
    if requested not in WATCH_MODES:
        raise ValueError(f"watch mode {requested!r} is not one of {', '.join(WATCH_MODES)}")
    if requested != "auto":
        return requested, "as asked"
    fstype = filesystem_type(path, mountinfo)
    if fstype and (fstype in POLLED_FILESYSTEMS or fstype.startswith("fuse.")):
        return "poll", f"{path} is on {fstype}, which reports no other machine's changes through inotify"
    return "events", f"{path} is on {fstype or 'a local filesystem'}"
