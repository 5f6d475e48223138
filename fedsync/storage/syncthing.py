"""Optional nudges to a local Syncthing: scan the folder fedsync just wrote now, instead of after Syncthing's
filesystem-watcher delay (at least 1 s per hop, and a round needs two hops). Only the REST API of the Syncthing
on this machine is called; without it, or if a call fails, Syncthing's own watcher still carries every file.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from fedsync.base.errors import ShareError
from fedsync.base.logs import Log
from fedsync.storage.share import Share

KEY_ENV = "FEDSYNC_SYNCTHING_KEY"


class SyncthingNudge:
    def __init__(self, url: str, key: str | None, share: Share, log: Log) -> None:
        folder = share.store.local_folder
        if folder is None:
            raise ShareError(f"--syncthing asks a Syncthing to rescan a folder; {share.where()} is an object store")
        self.url, self.share, self.log = url.rstrip("/"), folder.resolve(), log
        self.key = key or os.environ.get(KEY_ENV)
        if not self.key:
            raise ShareError(f"--syncthing needs the API key of that Syncthing: --syncthing-key, or {KEY_ENV} "
                             "(Syncthing's GUI: Actions > Settings > API Key)")
        self.failed = False
        self.folder = self._folder_id()

    def _call(self, path: str, method: str = "GET") -> object:
        req = urllib.request.Request(self.url + path, method=method, headers={"X-API-Key": self.key or ""})
        with urllib.request.urlopen(req, timeout=5) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def _folder_id(self) -> str:
        try:
            folders = self._call("/rest/config/folders")
        except (OSError, ValueError) as e:
            raise ShareError(f"cannot reach Syncthing's API at {self.url}: {e}") from None
        for folder in folders:  # type: ignore[union-attr]
            if Path(os.path.expanduser(folder["path"])).resolve() == self.share:
                return str(folder["id"])
        raise ShareError(f"the Syncthing at {self.url} shares no folder at {self.share}")

    def scan(self, sub: str) -> None:
        """Ask Syncthing to scan `sub` (a file or folder of the share, by its name in it) at once."""
        query = urllib.parse.urlencode({"folder": self.folder, "sub": sub})
        try:
            self._call(f"/rest/db/scan?{query}", "POST")
        except (OSError, ValueError) as e:
            if not self.failed:
                self.log(f"could not ask Syncthing to scan {sub} ({e}); its own watcher will pick it up")
            self.failed = True
            return
        self.failed = False
