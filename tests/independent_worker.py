"""A fedsync worker written from docs/PROTOCOL.md alone, for the built-in `digits` task: it imports nothing from
fedsync (only safetensors, blake3, pyyaml, cryptography, torch, scikit-learn's bundled data, and pyrage, an age
implementation in Rust, to seal its updates), so a run that accepts its updates every round shows the document is
complete. Section numbers below are PROTOCOL.md's.

It can also play an enrolled attacker (tests/test_attacks.py): with ATTACK `cycle` it signs, with its own key, an
update poisoned another way each round (ATTACKS, in order), from its honestly trained delta.

Usage: python tests/independent_worker.py SHARE NAME KEY_FILE [ATTACK]
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import sys
import threading
import time
from pathlib import Path

import blake3
import pyrage
import torch
import torch.nn.functional as F
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from sklearn.datasets import load_digits
from torch import nn

FORMAT = 2
TIMEOUT_S = 300


def write_whole(path: Path, data: bytes) -> None:
    """Section 4: a temporary name starting with a dot, fsync, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checked(path: Path, ref: dict) -> bytes | None:
    """Section 4: a file counts only with the size and BLAKE3 its marker names; otherwise not synced yet."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    ok = len(data) == ref["bytes"] and blake3.blake3(data).hexdigest() == ref["blake3"]
    return data if ok else None


def message(kind: str, fields: list[tuple[str, object]]) -> bytes:
    """Section 5.10: the first line, then `name value` lines, `-` for null."""
    lines = [f"fedsync {kind} v{FORMAT}"] + [f"{k} {'-' if v is None else v}" for k, v in fields]
    return ("\n".join(lines) + "\n").encode()


def verify(public: str, msg: bytes, signature: str | None) -> bool:
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public.removeprefix("ed25519:")))
        key.verify(base64.b64decode((signature or "").removeprefix("ed25519:")), msg)
        return True
    except Exception:  # noqa: BLE001 - any failure is "not signed by this key"
        return False


def encode(delta: dict[str, torch.Tensor], encoding: str) -> dict[str, torch.Tensor]:
    """Section 5.13: integer tensors as they are; floating ones as bf16, or as int8 blocks of 256 with a float32
    scale each (max |x| / 127), written as T#scale beside T. (Error feedback, section 7, is optional: not done.)"""
    out: dict[str, torch.Tensor] = {}
    for name, t in delta.items():
        if encoding == "none" or not t.is_floating_point():
            out[name] = t
        elif encoding == "bf16":
            out[name] = t.to(torch.bfloat16)
        else:
            flat = t.reshape(-1).float()
            n, blocks = flat.numel(), -(-flat.numel() // 256)
            rows = torch.cat([flat, torch.zeros(blocks * 256 - n)]).view(blocks, 256)
            scale = rows.abs().amax(dim=1) / 127
            q = torch.where(scale[:, None] > 0, torch.round(rows / scale[:, None]), torch.zeros_like(rows))
            out[name] = q.clamp(-127, 127).to(torch.int8).reshape(-1)[:n].reshape(t.shape).contiguous()
            out[name + "#scale"] = scale.contiguous()
    return out


# `cycle`, round by round: never three rejections in a row, or it would be excluded (exclude_after, section 5.9)
ATTACKS = ("flip5", "overflow", "honest", "inflate", "x1000", "honest", "huge", "stale_var", "honest", "noise",
           "replay", "honest")


def poisoned(attack: str, delta: dict[str, torch.Tensor], first: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What an attacker sends instead of its honest delta (`first`: its round-1 delta; `inflate` changes the
    claimed samples instead)."""
    floats = {k: v for k, v in delta.items() if v.is_floating_point()}
    if attack == "flip5":
        return {**delta, **{k: -5 * v for k, v in floats.items()}}
    if attack == "x1000":
        return {**delta, **{k: 1000 * v for k, v in floats.items()}}
    if attack == "huge":
        return {**delta, **{k: torch.full_like(v, 1e38) for k, v in floats.items()}}
    if attack == "noise":
        norm = torch.sqrt(sum(v.double().square().sum() for v in floats.values()))
        noise = {k: torch.randn_like(v) for k, v in floats.items()}
        scale = 10 * norm / torch.sqrt(sum(v.double().square().sum() for v in noise.values()))
        return {**delta, **{k: (v * scale).float() for k, v in noise.items()}}
    if attack == "overflow":
        return {k: torch.full_like(v, 2 ** 63 - 1) if k.endswith("num_batches_tracked") else v
                for k, v in delta.items()}
    if attack == "stale_var":  # honest weights, its round-1 variance deltas again
        return {k: first[k] if k.endswith("running_var") else v for k, v in delta.items()}
    if attack == "replay":
        return first
    return delta


def digits_cnn() -> nn.Module:
    """Section 5.4, "Built-in models": digits_cnn, layer by layer."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))


class Worker:
    def __init__(self, share: Path, name: str, key_file: Path, attack: str | None = None) -> None:
        self.share, self.name, self.attack = share, name, attack
        self.first: dict[str, torch.Tensor] | None = None  # its round-1 delta, for the replaying attacks
        if not key_file.exists():
            pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption())
            key_file.write_bytes(pem)
        self.key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        raw = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public = "ed25519:" + base64.b64encode(raw).decode()
        self.beat, self.state, self.round = 0, "idle", None
        self.lock = threading.Lock()

    def sign(self, msg: bytes) -> str:
        return "ed25519:" + base64.b64encode(self.key.sign(msg)).decode()

    def register(self) -> None:
        """Section 5.3, rewritten every `heartbeat` seconds."""
        with self.lock:
            self.beat += 1
            info = {"format": FORMAT, "name": self.name, "host": socket.gethostname(), "fedsync": "independent",
                    "torch": str(torch.__version__), "device": "cpu", "device_name": "CPU", "cuda_capability": None,
                    "state": self.state, "round": self.round, "heartbeat": self.beat, "public_key": self.public}
            (self.share / "workers").mkdir(exist_ok=True)
            write_whole(self.share / "workers" / f"{self.name}.yaml", yaml.safe_dump(info).encode())

    def run(self) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not (self.share / "fedsync.yaml").exists():
            time.sleep(0.2)
        run = yaml.safe_load((self.share / "fedsync.yaml").read_text())
        assert run["format"] == FORMAT, run["format"]
        self.run_id, self.cfg, self.coordinator = run["run_id"], run["config"], run["coordinator_key"]
        self.recipient = None  # section 5.15: seal every update to the coordinator's signed recipient
        if self.cfg.get("confidential_updates"):
            msg = message("recipient", [("run", self.run_id), ("recipient", run["recipient"])])
            if not verify(self.coordinator, msg, run.get("recipient_signature")):
                raise SystemExit("fedsync.yaml's recipient is not signed by the coordinator")
            self.recipient = pyrage.x25519.Recipient.from_str(run["recipient"])
        x, y = load_digits(return_X_y=True)  # section 5.4: the task's data in its own order
        self.x = torch.tensor(x / 16, dtype=torch.float32).reshape(-1, 1, 8, 8)
        self.y = torch.tensor(y, dtype=torch.int64)
        self.register()
        beating = threading.Thread(target=self._beat, daemon=True)
        beating.start()
        while time.monotonic() < deadline:
            if self._finished():
                return
            work = self._open_round()
            if work is None:
                time.sleep(0.2)
                continue
            self._train(*work)
        raise SystemExit("no final.yaml in time")

    def _beat(self) -> None:
        while True:
            time.sleep(float(self.cfg["heartbeat"]))
            self.register()

    def _rounds(self) -> list[int]:
        return sorted(int(p.name) for p in self.share.iterdir() if p.is_dir() and p.name.isdigit())

    def _finished(self) -> bool:
        """Section 7, step 4."""
        try:
            final = yaml.safe_load((self.share / "final.yaml").read_text())
        except (FileNotFoundError, yaml.YAMLError):
            return False
        msg = message("final", [("run", final["run_id"]), ("round", final["round"]),
                                ("model", final["model"]["blake3"]), ("bytes", final["model"]["bytes"])])
        rounds = self._rounds()
        return (verify(self.coordinator, msg, final.get("signature")) and final["run_id"] == self.run_id
                and final["round"] >= (rounds[-1] if rounds else 0))

    def _open_round(self) -> tuple[int, dict] | None:
        """Section 7, step 2."""
        for r in reversed(self._rounds()):
            folder = self.share / f"{r:04d}"
            if (folder / "summary.yaml").exists():
                return None
            try:
                a = yaml.safe_load((folder / "assignment.yaml").read_text())
            except (FileNotFoundError, yaml.YAMLError):
                return None
            fields = [("run", a["run_id"]), ("round", a["round"]), ("rounds", a["rounds"]),
                      ("model", a["model"]["blake3"]), ("bytes", a["model"]["bytes"]), ("num_shards", a["num_shards"]),
                      ("shards", a["shards"]["blake3"]), ("time_budget_ms", round(a["time_budget_s"] * 1000))]
            for name in sorted(a["workers"]):
                t = a["workers"][name]
                steps = t.get("local_steps")
                fields.append(("worker", f"{name}/{t['shard']}/{t['local_epochs']}/{'-' if steps is None else steps}"))
            if not verify(self.coordinator, message("assignment", fields), a.get("signature")):
                continue  # not the coordinator's: never trained on
            mine = self.name in a["workers"] and not (folder / "updates" / f"{self.name}.yaml").exists()
            return (r, a) if a["run_id"] == self.run_id and mine else None
        return None

    def _train(self, r: int, a: dict) -> None:
        """Section 7, step 3."""
        folder = self.share / f"{r:04d}"
        model_bytes = read_checked(folder / "global.safetensors", a["model"])
        shard_bytes = read_checked(self.share / a["shards"]["file"], a["shards"])
        if model_bytes is None or shard_bytes is None:
            return  # not synced whole yet
        started = time.monotonic()
        self.state, self.round = "training", r
        task = a["workers"][self.name]
        rows = st_load(shard_bytes)[str(task["shard"])]
        base = st_load(model_bytes)
        model = digits_cnn()
        model.load_state_dict(base)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=self.cfg["lr"], momentum=self.cfg["momentum"],
                              weight_decay=self.cfg["weight_decay"])
        bs, n = self.cfg["batch_size"], len(rows)
        gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{r}/{self.name}".encode()).digest()[:4],
                                                           "little"))
        steps, loss_sum, seen, distinct = 0, 0.0, 0, set()
        # section 5.4: exactly local_steps steps when it is set (passes repeat), else local_epochs passes
        total = task.get("local_steps") or task["local_epochs"] * -(-n // bs)
        while steps < total:
            order = rows[torch.randperm(n, generator=gen)]
            for start in range(0, n, bs):
                if steps == total:
                    break
                idx = order[start:start + bs]
                loss = F.cross_entropy(model(self.x[idx]), self.y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps, loss_sum, seen = steps + 1, loss_sum + float(loss.detach()) * len(idx), seen + len(idx)
                distinct.update(idx.tolist())
        trained = model.state_dict()
        delta = {k: (trained[k] - v).to(v.dtype).contiguous() for k, v in base.items()}
        self.first = self.first or delta
        attack = ATTACKS[(r - 1) % len(ATTACKS)] if self.attack == "cycle" else self.attack
        attack = None if attack == "honest" else attack
        samples = len(distinct) * (5 if attack == "inflate" else 1)
        if attack:
            delta = {k: v.contiguous() for k, v in poisoned(attack, delta, self.first).items()}
        encoding = self.cfg["compression"]
        data = st_save(encode(delta, encoding))
        file = f"{self.name}.safetensors"
        if self.recipient is not None:
            data, file = pyrage.encrypt(data, [self.recipient]), file + ".age"
        write_whole(folder / "updates" / file, data)
        tensors = {"file": file, "blake3": blake3.blake3(data).hexdigest(), "bytes": len(data)}
        marker = {"format": FORMAT, "round": r, "worker": self.name, "base": a["model"]["blake3"], "tensors": tensors,
                  "samples": samples, "steps": steps, "train_loss": loss_sum / seen,
                  "seconds": round(time.monotonic() - started, 3), "device": "cpu", "diverged": None,
                  "encoding": encoding, "encryption": "age" if self.recipient else "none"}
        signed = [("run", self.run_id), ("round", r), ("worker", self.name), ("base", a["model"]["blake3"]),
                  ("tensors", tensors["blake3"]), ("bytes", tensors["bytes"]), ("samples", samples),
                  ("steps", steps), ("diverged", "no")]
        signed += [("encoding", encoding)] if encoding != "none" else []
        signed += [("encryption", "age")] if self.recipient else []
        marker["signature"] = self.sign(message("update", signed))
        write_whole(folder / "updates" / f"{self.name}.yaml", yaml.safe_dump(marker, sort_keys=False).encode())
        self.state = "idle"
        print(f"round {r}: trained {n} examples in {steps} steps, train loss {loss_sum / seen:.4f}"
              + (f", sent {attack}" if attack else ""), flush=True)


if __name__ == "__main__":
    Worker(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None).run()
