"""A fedsync worker written from docs/PROTOCOL.md alone, for the built-in `digits` task: it imports nothing from
fedsync (only safetensors, blake3, pyyaml, cryptography, torch, numpy, scikit-learn's bundled data, and pyrage, an
age implementation in Rust, to seal its updates), so a run that accepts its updates every round shows the document
is complete; with secure_aggregation it takes every step of section 5.16 too. Section numbers below are
PROTOCOL.md's.

It can also play an enrolled attacker (tests/test_attacks.py): with ATTACK `cycle` it signs, with its own key, an
update poisoned another way each round (ATTACKS, in order), from its honestly trained delta.

Usage: python tests/independent_worker.py SHARE NAME KEY_FILE [ATTACK]
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

import blake3
import numpy as np
import pyrage
import torch
import torch.nn.functional as F
import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
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
        self.secure = Secure(self) if self.cfg.get("secure_aggregation") else None
        self.register()
        beating = threading.Thread(target=self._beat, daemon=True)
        beating.start()
        while time.monotonic() < deadline:
            if self._finished():
                return
            assigned = self._assigned_round()
            if assigned is not None and self.secure is not None and self.secure.step(*assigned):
                continue
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
        """Section 7, step 2: the round to train, not submitted yet (with secure aggregation: once roster 2 names
        this worker)."""
        work = self._assigned_round()
        if work is None or (self.share / f"{work[0]:04d}" / "updates" / f"{self.name}.yaml").exists():
            return None
        roster = self.secure.roster(work[0], 2) if self.secure else None
        return work if self.secure is None or (roster is not None and self.name in roster["workers"]) else None

    def _assigned_round(self) -> tuple[int, dict] | None:
        """The newest open round, if the coordinator signed it and it gives this worker a task."""
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
            return (r, a) if a["run_id"] == self.run_id and self.name in a["workers"] else None
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
        encoding = "secagg" if self.secure else self.cfg["compression"]
        data = self.secure.masked(r, a, delta, samples) if self.secure else st_save(encode(delta, encoding))
        file = f"{self.name}.safetensors"
        if self.recipient is not None and self.secure is None:
            data, file = pyrage.encrypt(data, [self.recipient]), file + ".age"
        write_whole(folder / "updates" / file, data)
        tensors = {"file": file, "blake3": blake3.blake3(data).hexdigest(), "bytes": len(data)}
        marker = {"format": FORMAT, "round": r, "worker": self.name, "base": a["model"]["blake3"], "tensors": tensors,
                  "samples": samples, "steps": steps, "train_loss": loss_sum / seen,
                  "seconds": round(time.monotonic() - started, 3), "device": "cpu", "diverged": None,
                  "encoding": encoding, "encryption": "age" if file.endswith(".age") else "none"}
        signed = [("run", self.run_id), ("round", r), ("worker", self.name), ("base", a["model"]["blake3"]),
                  ("tensors", tensors["blake3"]), ("bytes", tensors["bytes"]), ("samples", samples),
                  ("steps", steps), ("diverged", "no")]
        signed += [("encoding", encoding)] if encoding != "none" else []
        signed += [("encryption", "age")] if file.endswith(".age") else []
        marker["signature"] = self.sign(message("update", signed))
        write_whole(folder / "updates" / f"{self.name}.yaml", yaml.safe_dump(marker, sort_keys=False).encode())
        self.state = "idle"
        print(f"round {r}: trained {n} examples in {steps} steps, train loss {loss_sum / seen:.4f}"
              + (f", sent {attack}" if attack else ""), flush=True)


# --- section 5.16: secure aggregation -----------------------------------------------------------------------------

PRIME = 2**521 - 1


def hkdf(ikm: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt, info).derive(ikm)


def x25519_text(key: X25519PrivateKey) -> str:
    return "x25519:" + base64.b64encode(key.public_key().public_bytes_raw()).decode()


def x25519_key(text: str) -> X25519PublicKey:
    return X25519PublicKey.from_public_bytes(base64.b64decode(text.removeprefix("x25519:")))


def digest(entries: dict[str, str]) -> str:
    return blake3.blake3("".join(f"{k} {v}\n" for k, v in sorted(entries.items())).encode()).hexdigest()


def neighbours(workers: list[str], model: str) -> dict[str, set[str]]:
    """The graph: ordered by SHA-256 of `MODEL\\nNAME`, a ring with k/2 links each side, or everyone."""
    order = sorted(workers, key=lambda w: hashlib.sha256(f"{model}\n{w}".encode()).digest())
    n = len(order)
    k = 2 * math.ceil(math.log2(n)) if n > 1 else 0
    if k >= n - 1:
        return {w: set(order) - {w} for w in order}
    out: dict[str, set[str]] = {w: set() for w in order}
    for i, w in enumerate(order):
        for step in range(1, k // 2 + 1):
            for other in (order[(i - step) % n], order[(i + step) % n]):
                out[w].add(other)
                out[other].add(w)
    return out


def keystream_words(seed: bytes, count: int) -> np.ndarray:
    """ChaCha20 of zeros, counter and nonce zero, as little-endian 32-bit words."""
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(4 * count))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


class Secure:
    """This worker's steps of secure-aggregation rounds, from section 5.16 alone."""

    def __init__(self, worker: "Worker") -> None:
        self.w = worker
        self.secrets: dict[int, tuple[X25519PrivateKey, X25519PrivateKey, bytes]] = {}

    def folder(self, r: int) -> Path:
        return self.w.share / f"{r:04d}" / "secagg"

    def roster(self, r: int, step: int) -> dict | None:
        try:
            ro = yaml.safe_load((self.folder(r) / f"roster-{step}.yaml").read_text())
        except (FileNotFoundError, yaml.YAMLError):
            return None
        msg = message("secagg-roster", [("run", ro["run_id"]), ("round", ro["round"]), ("step", ro["step"]),
                                        ("workers", ",".join(ro["workers"]) or "-"), ("clip", repr(ro["clip"])),
                                        ("max_weight", ro["max_weight"]), ("keys", digest(ro["keys"]))])
        ok = verify(self.w.coordinator, msg, ro.get("signature")) and ro["run_id"] == self.w.run_id
        return ro if ok and ro["round"] == r and ro["step"] == step else None

    def holders(self, r: int, a: dict, sender: str) -> list[str]:
        first = self.roster(r, 1)
        return sorted(neighbours(first["workers"], a["model"]["blake3"])[sender] | {sender})

    def write(self, path: Path, kind: str, fields: list[tuple[str, object]], record: dict) -> None:
        record["signature"] = self.w.sign(message(kind, [("run", self.w.run_id)] + fields))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, yaml.safe_dump(record, sort_keys=False).encode())

    def step(self, r: int, a: dict) -> bool:
        """Steps 1, 2 and 4 when due; whether one was taken."""
        me = self.w.name
        if r not in self.secrets:
            self.secrets[r] = (X25519PrivateKey.generate(), X25519PrivateKey.generate(), os.urandom(32))
        c, s, seed = self.secrets[r]
        keys = self.folder(r) / "keys" / f"{me}.yaml"
        if not keys.exists():
            record = {"format": FORMAT, "round": r, "worker": me, "c_key": x25519_text(c), "s_key": x25519_text(s)}
            self.write(keys, "secagg-keys", [("round", r), ("worker", me), ("c", record["c_key"]),
                                             ("s", record["s_key"])], record)
            return True
        first = self.roster(r, 1)
        if first is None or me not in first["workers"]:
            return False
        shares = self.folder(r) / "shares" / f"{me}.yaml"
        if not shares.exists():
            holders = self.holders(r, a, me)
            t = len(holders) // 2 + 1
            polys = [[int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
                     for secret in (seed, s.private_bytes_raw())]
            envelopes = {}
            for i, h in enumerate(holders):
                x = i + 1
                body = b"".join((sum(co * pow(x, j, PRIME) for j, co in enumerate(p)) % PRIME).to_bytes(66, "big")
                                for p in polys)
                key = ChaCha20Poly1305(hkdf(c.exchange(x25519_key(first["keys"][h].split(" ")[0])), None,
                                            b"fedsync secagg envelope v1"))
                nonce = os.urandom(12)
                sealed = nonce + key.encrypt(nonce, body, f"{self.w.run_id}\n{r}\n{me}\n{h}\n".encode())
                envelopes[h] = base64.b64encode(sealed).decode()
            record = {"format": FORMAT, "round": r, "worker": me, "envelopes": envelopes}
            self.write(shares, "secagg-shares", [("round", r), ("worker", me), ("envelopes", digest(envelopes))],
                       record)
            return True
        third, second = self.roster(r, 3), self.roster(r, 2)
        reveal = self.folder(r) / "reveal" / f"{me}.yaml"
        if third is None or second is None or me not in third["workers"] or reveal.exists():
            return False
        survivors, sharers = set(third["workers"]), set(second["workers"])
        answer = {}
        refused = not survivors <= sharers
        for sender in sorted(sharers):
            holders = self.holders(r, a, sender)
            if me not in holders:
                continue
            if len(set(holders) & survivors) < len(holders) // 2 + 1:
                refused = True
            env = base64.b64decode(yaml.safe_load((self.folder(r) / "shares" / f"{sender}.yaml").read_text())
                                   ["envelopes"][me])
            key = ChaCha20Poly1305(hkdf(c.exchange(x25519_key(first["keys"][sender].split(" ")[0])), None,
                                        b"fedsync secagg envelope v1"))
            try:
                body = key.decrypt(env[:12], env[12:], f"{self.w.run_id}\n{r}\n{sender}\n{me}\n".encode())
            except Exception:  # noqa: BLE001 - an envelope that does not open: nothing of that sender's
                continue
            kind, share = ("self", body[:66]) if sender in survivors else ("pair", body[66:])
            answer[sender] = f"{kind}:{base64.b64encode(share).decode()}"
        answer = {} if refused else answer
        self.write(reveal, "secagg-reveal", [("round", r), ("worker", me), ("shares", digest(answer))],
                   {"format": FORMAT, "round": r, "worker": me, "shares": answer})
        return True

    def masked(self, r: int, a: dict, delta: dict[str, torch.Tensor], samples: int) -> bytes:
        """Step 3: the masked input's file."""
        first, second = self.roster(r, 1), self.roster(r, 2)
        c, s, seed = self.secrets[r]
        clip = first["clip"]
        values = torch.cat([delta[k].double().reshape(-1) for k in sorted(delta) if delta[k].is_floating_point()])
        norm = float(values.norm())
        values = torch.cat([values * (clip / norm if norm > clip else 1.0), torch.tensor([clip], dtype=torch.float64)])
        scale = (2**31 - 1) / (len(first["workers"]) * first["max_weight"] * clip)
        words = (torch.trunc(values * samples * scale).to(torch.int64).numpy() % 2**32).astype(np.uint32)
        words += keystream_words(seed, len(words))
        for v in neighbours(first["workers"], a["model"]["blake3"])[self.w.name] & set(second["workers"]):
            low, high = sorted((self.w.name, v))
            pair = hkdf(s.exchange(x25519_key(first["keys"][v].split(" ")[1])),
                        f"{self.w.run_id}\n{r}\n{low}\n{high}\n".encode(), b"fedsync secagg pairwise mask v1")
            words += keystream_words(pair, len(words)) if self.w.name == low else -keystream_words(pair, len(words))
        return st_save({"masked": torch.from_numpy(words.view(np.int32).copy())})


if __name__ == "__main__":
    Worker(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None).run()
