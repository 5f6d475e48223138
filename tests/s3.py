"""A real S3-compatible server for tests: moto's standalone server (the one s3fs's own tests use) on 127.0.0.1,
started and stopped by the test, with one bucket; fedsync reaches it through AWS_ENDPOINT_URL as it would R2 or
MinIO."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.helpers import missing
from tests.ports import free_port

BUCKET = "fedsync-test"


class S3Server:
    """`with S3Server() as s3:` runs the server until the block ends; `s3.env` is what a fedsync process needs."""

    def __init__(self, log: Path | None = None) -> None:
        """`log`: a file for the server's request log (one line per request), to count what a run costs."""
        self.port, self.log = free_port(), log
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": "fedsync-test", "AWS_SECRET_ACCESS_KEY": "fedsync-test-secret",
                    "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1"}
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> S3Server:
        server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
        if server is None:
            missing("needs moto's S3 server: pip install 'moto[server]' (requirements.txt has it)")
        out = open(self.log, "wb") if self.log else subprocess.DEVNULL  # noqa: SIM115 - the server keeps it
        self.proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(self.port)], stdout=out,
                                     stderr=subprocess.STDOUT)
        end = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    self.__exit__()
                    raise RuntimeError(f"moto_server did not answer on {self.endpoint}") from None
                time.sleep(0.1)
        self.make_bucket(BUCKET)
        return self

    def make_bucket(self, bucket: str) -> None:
        req = urllib.request.Request(f"{self.endpoint}/{bucket}", method="PUT")  # moto needs no signature here
        urllib.request.urlopen(req, timeout=5).close()

    def url(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def use_in_this_process(server: S3Server) -> None:
    """Point this process's obstore at the server (fedsync reads the store's usual environment variables)."""
    os.environ.update(server.env)
