"""Round time through an object store against the same run on a local folder, measured in the same run: digits,
a coordinator and 2 workers, on a real S3-compatible server (moto's, on 127.0.0.1, as tests/test_object_store.py
starts it) and on a local share. Prints the median round time (rounds 2.., from summary.yaml) of each, their ratio,
and the requests the S3 run made (from the server's request log): LIST requests per second per process, the
polling cost docs/PROTOCOL.md section 4 ("On an object store") states. Usage: python benchmarks/object_store_rounds.py
[ROUNDS]
"""

from __future__ import annotations

import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ holds the S3 server harness

from benchmarks.syncthing_rounds import run  # noqa: E402
from tests.s3 import S3Server, use_in_this_process  # noqa: E402

REQUEST = re.compile(r'"(GET|PUT|HEAD|POST|DELETE) (\S+)')


def kinds(log: Path) -> Counter[str]:
    """The server's requests by kind: LIST (a GET with list-type), GET, HEAD, PUT (parts and uploads), other."""
    out: Counter[str] = Counter()
    for method, target in REQUEST.findall(log.read_text(errors="replace")):
        out["LIST" if method == "GET" and "list-type=2" in target else method] += 1
    return out


def main(rounds: int = 8) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "local").mkdir()
        local = run(t / "local", [t / "local", t / "local"], rounds)
        with S3Server(log=t / "s3.log") as s3:
            use_in_this_process(s3)  # this process reads the summaries
            started = time.monotonic()
            remote = run(s3.url("bench"), [s3.url("bench")] * 2, rounds, env=s3.env)
            seconds = time.monotonic() - started
            requests = kinds(t / "s3.log")
    lm, rm = statistics.median(local), statistics.median(remote)
    print(f"round time, digits, 2 workers, rounds 2..{rounds}, medians:")
    print(f"  local share: {lm:.2f} s")
    print(f"  S3 (moto on 127.0.0.1): {rm:.2f} s -> {rm - lm:+.2f} s per round, ratio {rm / lm:.2f}x")
    total = sum(requests.values())
    print(f"  S3 requests over the whole run ({seconds:.0f} s, 3 processes): {total} "
          + ", ".join(f"{k} {v}" for k, v in requests.most_common()))
    print(f"  LIST requests per second per process: {requests['LIST'] / seconds / 3:.2f}; all requests per second "
          f"per process: {total / seconds / 3:.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
