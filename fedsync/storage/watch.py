"""Waiting for the share to change, in the way that works on its medium, plus a periodic rescan.

Local disks report changes through inotify (watchdog's Observer). Network and FUSE filesystems (NFS, SMB/CIFS,
sshfs, rclone) report no writes made by *other* machines that way, so there fedsync polls. Events only wake the
loop; the loop then rescans the share and decides from what is there, so a missed, merged or reordered event
costs at most one rescan interval, never correctness.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path
from types import TracebackType

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from fedsync.storage.share import ROUND_DIR, is_temporary

WATCH_MODES = ("auto", "events", "poll")
# Filesystems whose remote changes never reach inotify. "fuse." covers sshfs, rclone, smbnetfs and the like;
# "fuseblk" (ntfs-3g and other local block devices) does report local changes and is not listed.
POLLED_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre",
                      "davfs", "fuse")
POLLED_ROUNDS = 3  # the newest round folders a poller looks into (late updates are at most this old)
# watchdog logs an error when an event arrives while its emitter thread stops; during our own stop that is noise.
_EMITTER_LOG = logging.getLogger("watchdog.observers.inotify")
# watchdog 7 warns when a folder it already watches is added again (Syncthing creates folders that way); the
# watch stays correct, so the warning is noise on every synced round.
warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)


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


class _Wake(FileSystemEventHandler):
    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # our own reads would wake us
        if event.is_directory and event.event_type == "modified":
            return  # a folder's mtime moves with every temporary file; the files' own events matter
        path = str(getattr(event, "dest_path", "") or event.src_path)
        if not is_temporary(Path(path).name):
            self.flag.set()


class _Poller(threading.Thread):
    """Every `interval` seconds, list the folders where the protocol is active; wake on any difference."""

    def __init__(self, root: Path, flag: threading.Event, interval: float) -> None:
        super().__init__(name="share-poller", daemon=True)
        self.root, self.flag, self.interval = root, flag, interval
        self.stopping = threading.Event()
        self.previous: frozenset[tuple[str, str, int, int, int]] | None = None

    def folders(self) -> list[Path]:
        try:
            rounds = sorted(n for n in os.listdir(self.root) if ROUND_DIR.match(n))[-POLLED_ROUNDS:]
        except OSError:
            rounds = []
        out = [self.root, self.root / "workers"]
        for r in rounds:
            out += [self.root / r, self.root / r / "updates"]
        return out

    def snapshot(self) -> frozenset[tuple[str, str, int, int, int]]:
        seen = []
        for folder in self.folders():
            try:
                with os.scandir(folder) as entries:
                    for e in entries:
                        if is_temporary(e.name):
                            continue
                        st = e.stat(follow_symlinks=False)
                        if e.is_dir(follow_symlinks=False):  # its mtime moves with every temporary file
                            seen.append((str(folder), e.name, 0, 0, st.st_ino))
                        else:
                            seen.append((str(folder), e.name, st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                continue  # absent for now, or the share hiccupped: the next poll looks again
        return frozenset(seen)

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            now = self.snapshot()
            if self.previous is not None and now != self.previous:
                self.flag.set()
            self.previous = now


class ShareWatcher:
    """`with ShareWatcher(root) as w: ... w.wait(seconds)` returns early when something in the share changed."""

    def __init__(self, root: Path, mode: str = "auto", poll_interval: float = 1.0) -> None:
        self.root = root
        self.mode, self.why = choose_mode(mode, root)
        self.changed = threading.Event()
        self.poller: _Poller | None = None
        self.observer = None
        if self.mode == "poll":
            self.poller = _Poller(root, self.changed, poll_interval)
            self.describe = f"polling every {poll_interval:g} s ({self.why})"
        else:
            self.observer = Observer()
            self.observer.schedule(_Wake(self.changed), str(root), recursive=True)
            self.describe = f"inotify events ({self.why})"

    def __enter__(self) -> ShareWatcher:
        if self.poller is not None:
            self.poller.previous = self.poller.snapshot()
            self.poller.start()
        else:
            self.observer.start()  # type: ignore[union-attr]
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.poller is not None:
            self.poller.stopping.set()
            self.poller.join(timeout=5)
            return
        level = _EMITTER_LOG.level
        _EMITTER_LOG.setLevel(logging.CRITICAL)
        try:
            self.observer.stop()  # type: ignore[union-attr]
            self.observer.join(timeout=5)  # type: ignore[union-attr]
        finally:
            _EMITTER_LOG.setLevel(level)

    def wait(self, timeout: float) -> bool:
        """Block until a change or `timeout` seconds; True if something changed."""
        changed = self.changed.wait(max(0.0, timeout))
        self.changed.clear()
        return changed
