"""A FUSE mount for tests: a throwaway sshd on 127.0.0.1 and an sshfs mount of one folder onto another path,
so writes made on one side reach the other only through FUSE (no inotify events, as on a real remote mount)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.ports import free_port


class SshfsMount:
    """`with SshfsMount(tmp, source, mountpoint):` shows `source` at `mountpoint` through sshfs."""

    def __init__(self, base: Path, source: Path, mountpoint: Path) -> None:
        self.base, self.source, self.mountpoint = base / "sshd", source, mountpoint
        self.port = free_port()
        self.sshd: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SshfsMount:
        d = self.base
        d.mkdir(parents=True)
        os.chmod(d, 0o700)
        for key in ("host", "client"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
        (d / "authorized_keys").write_text((d / "client.pub").read_text())
        os.chmod(d / "authorized_keys", 0o600)
        (d / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nPidFile {d / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\nPermitRootLogin yes\n"
            "StrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\n")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
        self.sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                                     stdout=(d / "sshd.log").open("wb"), stderr=subprocess.STDOUT)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        user = os.environ.get("USER") or "root"
        options = (f"port={self.port},IdentityFile={d / 'client'},StrictHostKeyChecking=no,"
                   "UserKnownHostsFile=/dev/null,dir_cache=no,reconnect")
        end = time.monotonic() + 20
        while True:
            mounted = subprocess.run(["sshfs", f"{user}@127.0.0.1:{self.source}", str(self.mountpoint), "-o",
                                      options], capture_output=True, text=True)
            if mounted.returncode == 0:
                return self
            if time.monotonic() > end:
                self._stop()
                raise RuntimeError(f"sshfs failed: {mounted.stderr}\n{(d / 'sshd.log').read_text()}")
            time.sleep(0.3)  # sshd still starting

    def _stop(self) -> None:
        if self.sshd and self.sshd.poll() is None:
            self.sshd.terminate()
            self.sshd.wait(timeout=10)

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["fusermount", "-u", "-z", str(self.mountpoint)], capture_output=True)
        subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        self._stop()
