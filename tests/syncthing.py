"""Two real Syncthing instances on 127.0.0.1 sharing one folder, for tests: no discovery, relays or NAT; the
folder is watched with fsWatcherDelayS=1 as scripts/setup_syncthing.md recommends."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from tests.ports import free_port

FOLDER_ID = "fedsync"
STIGNORE = "// fedsync's temporary files are never whole: do not sync them\n.*.tmp\n"



def _set(parent: ET.Element, tag: str, text: str) -> None:
    el = parent.find(tag)
    if el is None:
        el = ET.SubElement(parent, tag)
    el.text = text


@dataclass
class Instance:
    name: str
    home: Path
    folder: Path
    device_id: str
    gui_port: int
    listen_port: int
    api_key: str
    proc: subprocess.Popen[bytes] | None = None

    def fedsync_args(self) -> list[str]:
        """The options that let a fedsync process on this copy nudge this instance."""
        return ["--syncthing", f"http://127.0.0.1:{self.gui_port}", "--syncthing-key", self.api_key]

    def api(self, path: str, method: str = "GET", body: object | None = None) -> object:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.gui_port}{path}", method=method, data=data,
                                     headers={"X-API-Key": self.api_key, "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            body = resp.read()
        return json.loads(body) if body else None


class SyncthingPair:
    """`with SyncthingPair(tmp, a_dir, b_dir) as pair:` keeps a_dir and b_dir in sync until the block ends."""

    def __init__(self, base: Path, folder_a: Path, folder_b: Path, watcher_delay_s: int = 1,
                 rate_kib_s: int = 0) -> None:
        self.watcher_delay_s = watcher_delay_s  # fsWatcherDelayS: Syncthing's own default is 10
        self.rate_kib_s = rate_kib_s  # each instance's send and receive limit in KiB/s (a slow link); 0: none
        self.instances = [self._generate(base / f"st-{n}", n, f) for n, f in (("a", folder_a), ("b", folder_b))]

    def _generate(self, home: Path, name: str, folder: Path) -> Instance:
        out = subprocess.run(["syncthing", "generate", f"--home={home}", "--no-default-folder"],
                             capture_output=True, text=True, check=True)
        device_id = next(line.split("Device ID:")[1].strip() for line in (out.stdout + out.stderr).splitlines()
                         if "Device ID:" in line)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".stfolder").mkdir(exist_ok=True)
        (folder / ".stignore").write_text(STIGNORE)
        return Instance(name, home, folder, device_id, free_port(), free_port(), f"fedsync-test-{name}")

    def _configure(self, me: Instance, peer: Instance) -> None:
        path = me.home / "config.xml"
        tree = ET.parse(path)
        root = tree.getroot()
        gui = root.find("gui")
        _set(gui, "address", f"127.0.0.1:{me.gui_port}")
        _set(gui, "apikey", me.api_key)
        opts = root.find("options")
        for tag, text in (("listenAddress", f"tcp://127.0.0.1:{me.listen_port}"), ("globalAnnounceEnabled", "false"),
                          ("localAnnounceEnabled", "false"), ("relaysEnabled", "false"), ("natEnabled", "false"),
                          ("startBrowser", "false"), ("urAccepted", "-1"), ("autoUpgradeIntervalH", "0"),
                          ("crashReportingEnabled", "false"), ("reconnectionIntervalS", "1"),
                          ("setLowPriority", "false"), ("maxSendKbps", str(self.rate_kib_s)),
                          ("maxRecvKbps", str(self.rate_kib_s)), ("limitBandwidthInLan", "true")):
            _set(opts, tag, text)
        device = ET.SubElement(root, "device", id=peer.device_id, name=peer.name, compression="metadata",
                               introducer="false")
        _set(device, "address", f"tcp://127.0.0.1:{peer.listen_port}")
        folder = ET.SubElement(root, "folder", id=FOLDER_ID, label=FOLDER_ID, path=str(me.folder),
                               type="sendreceive", rescanIntervalS="60", fsWatcherEnabled="true",
                               fsWatcherDelayS=str(self.watcher_delay_s), ignorePerms="false", autoNormalize="true")
        for d in (me.device_id, peer.device_id):
            ET.SubElement(folder, "device", id=d, introducedBy="")
        tree.write(path)

    def __enter__(self) -> SyncthingPair:
        a, b = self.instances
        self._configure(a, b)
        self._configure(b, a)
        for inst in self.instances:
            inst.proc = subprocess.Popen(["syncthing", "serve", f"--home={inst.home}", "--no-browser", "--no-restart",
                                          "--skip-port-probing"], stdout=(inst.home / "log.txt").open("wb"),
                                         stderr=subprocess.STDOUT, env={"STNOUPGRADE": "1", "HOME": str(inst.home),
                                                                        "PATH": "/usr/bin:/bin"})
        self.wait_connected(60)
        return self

    def connected(self) -> bool:
        a, b = self.instances
        try:
            conns = a.api("/rest/system/connections")["connections"]  # type: ignore[index]
        except OSError:
            return False
        return bool(conns.get(b.device_id, {}).get("connected"))

    def wait_connected(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not self.connected():
            if time.monotonic() > end:
                raise TimeoutError("the two Syncthing instances did not connect:\n" + self.logs())
            time.sleep(0.2)

    def pause(self) -> None:
        """Cut the link for this folder: both sides pause it (pausing devices instead costs a slow reconnect)."""
        for inst in self.instances:
            inst.api(f"/rest/config/folders/{FOLDER_ID}", "PATCH", {"paused": True})

    def resume(self) -> None:
        for inst in self.instances:
            inst.api(f"/rest/config/folders/{FOLDER_ID}", "PATCH", {"paused": False})

    def rescan(self) -> None:
        """Ask both sides to look at the folder now (after a partition, pulls may be in a retry backoff)."""
        for inst in self.instances:
            inst.api(f"/rest/db/scan?folder={FOLDER_ID}", "POST")

    def logs(self) -> str:
        return "\n".join(f"--- syncthing {i.name}\n" + (i.home / "log.txt").read_text()[-3000:]
                         for i in self.instances if (i.home / "log.txt").exists())

    def __exit__(self, *exc: object) -> None:
        for inst in self.instances:
            if inst.proc and inst.proc.poll() is None:
                inst.proc.terminate()
        for inst in self.instances:
            if inst.proc:
                try:
                    inst.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    inst.proc.kill()
