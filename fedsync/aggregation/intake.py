"""Taking in updates: each file is read once, in pieces, and each piece is hashed, checked, measured (its share
of the L2 norm screening uses) and added while it is still in the CPU cache. That single pass is what lets a
2-core machine aggregate faster than it can hash with SHA-256 (see docs/BENCHMARKS.md).

Adding before the whole-file hash is known is speculative: a lane (one thread with its own running sum)
that added part of a file which then fails is rebuilt from its accepted updates, re-verified. So the result
is always the aggregate of exactly the valid updates, and a bad file costs time, never correctness.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from fedsync.aggregation.encoding import (
    BLOCK,
    ENCODINGS,
    NONE,
    SCALE_SUFFIX,
    blocks,
    dequantize,
    encoded_layout,
    scale_name,
)
from fedsync.aggregation.rules import Collected
from fedsync.aggregation.tensors import DTYPES, SPELLING, file_layout
from fedsync.fedavg import Layout, WeightedSum
from fedsync.storage import names
from fedsync.storage.hashing import Hasher
from fedsync.storage.markers import FileRef
from fedsync.storage.reasons import Reason, Unusable
from fedsync.storage.store import LinkRefused, Reader, Store, read_upto
from fedsync.storage.tensorfile import FileLayout, TensorSpec, check_layout, header_length, parse_header

PIECE_BYTES = 1 << 20  # fits in L2 with room to spare; a multiple of every dtype's size
LANES = 2  # one running sum each: extra memory is LANES model sizes, whatever the number of updates


@dataclass(frozen=True)
class Candidate:
    """An update whose marker passed its checks; its tensor file is what remains to verify."""

    worker: str
    name: str  # the tensor file's name in the share
    ref: FileRef
    weight: float
    round: int = 0  # the round the update was trained for (a late one's is older than the open round's)
    steps: int = 1  # local optimizer steps, for rules that normalise by them (FedNova)
    encoding: str = NONE  # how the file holds the delta (fedsync/aggregation/encoding.py)


@dataclass
class Outcome:
    candidate: Candidate
    problem: Unusable | None = None


@dataclass
class _Lane:
    layout: Layout
    groups: dict[bool, WeightedSum] = field(default_factory=dict)  # late? -> the running sum of those updates
    accepted: list[Candidate] = field(default_factory=list)
    norms: dict[Candidate, float] = field(default_factory=dict)
    scales: dict[Candidate, float] = field(default_factory=dict)  # clipped updates: their floats count x scale
    piece: bytearray = field(default_factory=lambda: bytearray(PIECE_BYTES))
    floats: torch.Tensor = field(default_factory=lambda: torch.empty(PIECE_BYTES, dtype=torch.float32))  # int8, decoded

    def running_sum(self, late: bool) -> WeightedSum:
        if late not in self.groups:
            self.groups[late] = WeightedSum(self.layout)
        return self.groups[late]


def _read_exact(f: Reader, view: memoryview) -> None:
    if read_upto(f, view) < len(view):
        raise Unusable(Reason.SIZE_MISMATCH, "the file ended early (truncated while being read)")


def _square_sum(values: torch.Tensor) -> float:
    """The piece's sum of squares, for the update's L2 norm: one pass over cache-hot data. NaN when an element is
    NaN or infinite (checked element-wise only when the fast sum is not finite); inf when finite values are so
    large that their squares overflow, which screening then rejects as an outlier."""
    v = values if values.dtype in (torch.float32, torch.float64) else values.float()
    square = float(torch.dot(v, v))
    return square if math.isfinite(square) or bool(torch.isfinite(values).all()) else math.nan


def _scales(data: bytearray, name: str) -> torch.Tensor:
    """An int8 tensor's block scales, which must be finite and not negative."""
    scales = torch.frombuffer(data, dtype=torch.float32) if data else torch.empty(0)
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise Unusable(Reason.BAD_ENCODING, f"{name} holds negative, NaN or infinite scales")
    return scales


def fold(c: Candidate, store: Store, layout: FileLayout, sums: WeightedSum, piece: bytearray,
         floats: torch.Tensor, scale: float = 1.0, whole: bool = True) -> float:
    """Read c's tensor file once (`layout`: what its encoding holds), adding the decoded delta to `sums` (its floating
    tensors times `scale`; without `whole` only those, and it is not counted again: a correction of an update
    already added); raise Unusable if it does not count, with `added` set when part of it was summed already (the
    caller then rebuilds `sums`). Returns the update's L2 norm over its floating tensors (decoded), unscaled.
    `floats` holds an int8 piece's decoded values."""
    added = False
    squares = 0.0
    short = names.basename(c.name)
    hasher = Hasher()
    view = memoryview(piece)
    try:
        with store.open(c.name, follow_links=False) as f:
            size = f.size
            if size != c.ref.bytes:
                raise Unusable(Reason.SIZE_MISMATCH, f"{size} bytes, the marker says {c.ref.bytes}")
            first = bytearray(8)
            prefix = bytes(first[:read_upto(f, memoryview(first))])
            hasher.update(prefix)
            problem: Unusable | None = None
            specs: list[TensorSpec] = []
            try:
                n = header_length(prefix, size)
                header = bytearray(n)
                _read_exact(f, memoryview(header))
                hasher.update(header)
                specs = parse_header(bytes(header), size - 8 - n)
                check_layout(specs, layout, SPELLING)
            except Unusable as e:
                problem, specs = e, []
            remaining = size - f.tell()
            scales: dict[str, torch.Tensor] = {}  # int8: each tensor's block scales, read before its values
            for spec in specs:
                dtype = DTYPES[spec.dtype]
                itemsize = dtype.itemsize
                offset, left = 0, spec.end - spec.start
                scale_of = spec.name[:-len(SCALE_SUFFIX)] if c.encoding == "int8" and spec.name.endswith(
                    SCALE_SUFFIX) else None
                quantized = c.encoding == "int8" and scale_name(spec.name) in layout
                scale_bytes = bytearray()
                while left:
                    m = min(PIECE_BYTES, left)
                    _read_exact(f, view[:m])
                    hasher.update(view[:m])
                    left -= m
                    remaining -= m
                    if problem is not None:
                        continue  # keep hashing: a hash mismatch means "not synced yet", not "bad"
                    if scale_of is not None:
                        scale_bytes += view[:m]
                        continue
                    values = torch.frombuffer(piece, dtype=dtype, count=m // itemsize)
                    if quantized:
                        if spec.name not in scales:
                            problem = Unusable(Reason.BAD_ENCODING, f"{spec.name}'s int8 values come before its "
                                                                    f"scales {scale_name(spec.name)}")
                            continue
                        values = dequantize(values, scales[spec.name][offset // BLOCK:], floats)
                    square = _square_sum(values) if values.is_floating_point() else 0.0
                    if math.isnan(square):
                        problem = Unusable(Reason.NON_FINITE, f"{spec.name} holds NaN or infinite values")
                        continue
                    squares += square
                    if values.is_floating_point():
                        sums.add_piece(spec.name, offset, values, c.weight * scale)
                    elif whole:
                        sums.add_piece(spec.name, offset, values, c.weight)
                    added = True
                    offset += values.numel()
                if scale_of is not None and problem is None:
                    try:
                        scales[scale_of] = _scales(scale_bytes, spec.name)
                    except Unusable as e:
                        problem = e
            while remaining:  # only when the header was unusable: hash the rest to tell corrupt from unsynced
                m = min(PIECE_BYTES, remaining)
                _read_exact(f, view[:m])
                hasher.update(view[:m])
                remaining -= m
    except FileNotFoundError:
        raise Unusable(Reason.MISSING_FILE, f"{short} is not there (yet)") from None
    except LinkRefused:
        raise Unusable(Reason.BAD_PATH, f"{short} is a symbolic link") from None
    except Unusable as e:
        e.added = added
        raise
    except OSError as e:
        err = Unusable(Reason.IO_ERROR, f"{short}: {e.strerror or e}")
        err.added = added
        raise err from None
    if hasher.hexdigest() != c.ref.blake3:
        problem = Unusable(Reason.HASH_MISMATCH, "the file's BLAKE3 differs from the marker's")
    if problem is not None:
        problem.added = added
        raise problem
    if whole:
        sums.add_weight(c.weight)
    return math.sqrt(squares)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Each lane is one thread; torch's own intra-op threads on top would only oversubscribe the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Aggregator:
    """Streaming intake of round `round`'s updates, fed in batches as their markers appear: each verified and added
    to a weighted sum with its rule weight. Late updates (trained for an earlier round) are summed apart, so the
    round's aggregate can be taken with them or without (a server optimizer's state learns from the on-time ones)."""

    def __init__(self, layout: Layout, store: Store, lanes: int = LANES, round: int = 0) -> None:
        self.layout, self.store, self.file_layout, self.round = layout, store, file_layout(layout), round
        self.layouts = {e: encoded_layout(self.file_layout, e) for e in ENCODINGS}  # what each encoding's file holds
        self.lanes = [_Lane(layout) for _ in range(lanes)]
        self.pool = ThreadPoolExecutor(lanes, thread_name_prefix="intake")

    @property
    def accepted(self) -> list[Candidate]:
        return [c for lane in self.lanes for c in lane.accepted]

    @property
    def norms(self) -> dict[Candidate, float]:
        """Each accepted update's L2 norm, measured while it was read."""
        return {c: lane.norms[c] for lane in self.lanes for c in lane.accepted}

    def take(self, candidates: list[Candidate]) -> list[Outcome]:
        """Verify and add each candidate; the outcomes say which were added and why the others were not."""
        plan: list[list[Candidate]] = [[] for _ in self.lanes]
        for c in candidates:  # fewest updates first: lanes stay even without knowing sizes
            i = min(range(len(self.lanes)), key=lambda j: len(self.lanes[j].accepted) + len(plan[j]))
            plan[i].append(c)
        with _torch_threads(1):
            results = list(self.pool.map(self._run_lane, self.lanes, plan))
        return [o for lane_outcomes in results for o in lane_outcomes]

    def _run_lane(self, lane: _Lane, batch: list[Candidate]) -> list[Outcome]:
        outcomes, dirty = [], False
        for c in batch:
            try:
                lane.norms[c] = fold(c, self.store, self.layouts[c.encoding], lane.running_sum(self.late(c)),
                                     lane.piece, lane.floats)
                lane.accepted.append(c)
                outcomes.append(Outcome(c))
            except Unusable as e:
                dirty |= e.added
                outcomes.append(Outcome(c, e))
        if dirty:
            outcomes.extend(self._rebuild(lane))
        return outcomes

    def _rebuild(self, lane: _Lane) -> list[Outcome]:
        """Recompute a lane's sum from its accepted updates; any that no longer verify are dropped."""
        dropped: list[Outcome] = []
        while True:
            for sums in lane.groups.values():
                sums.clear()
            for c in lane.accepted:
                try:
                    lane.norms[c] = fold(c, self.store, self.layouts[c.encoding], lane.running_sum(self.late(c)),
                                         lane.piece, lane.floats, lane.scales.get(c, 1.0))
                except Unusable as e:
                    lane.accepted.remove(c)
                    lane.scales.pop(c, None)
                    dropped.append(Outcome(c, e))
                    break
            else:
                return dropped

    def late(self, c: Candidate) -> bool:
        return c.round != self.round

    @property
    def has_late(self) -> bool:
        return any(self.late(c) for c in self.accepted)

    def drop(self, rejected: dict[Candidate, Unusable]) -> list[Outcome]:
        """Take accepted updates back out (screened out, or found to spoil the aggregate): each lane that held
        one is rebuilt from its remaining files, so the sum is again exactly that of the updates still accepted (any
        that no longer verify are dropped too)."""
        outcomes = [Outcome(c, problem) for c, problem in rejected.items()]
        for lane in self.lanes:
            held = any(c in rejected for c in lane.accepted)
            lane.accepted = [c for c in lane.accepted if c not in rejected]
            lane.scales = {c: s for c, s in lane.scales.items() if c not in rejected}
            if held:
                outcomes.extend(self._rebuild(lane))
        return outcomes

    @property
    def scales(self) -> dict[Candidate, float]:
        """The clipped updates and what their floating tensors count times."""
        return {c: s for lane in self.lanes for c, s in lane.scales.items()}

    def clip(self, bound: float) -> list[Outcome]:
        """Scale every accepted update whose L2 norm is over `bound` down to it: one more read of each such file
        adds the difference, (bound / norm - 1) x its floats. A file that changed in between is dropped (outcome)
        and its lane rebuilt."""
        outcomes: list[Outcome] = []
        for lane in self.lanes:
            while over := [c for c in lane.accepted if c not in lane.scales and lane.norms[c] > bound]:
                c = over[0]
                scale = bound / lane.norms[c]
                try:
                    with _torch_threads(1):
                        fold(c, self.store, self.layouts[c.encoding], lane.running_sum(self.late(c)), lane.piece,
                             lane.floats, scale - 1.0, whole=False)
                    lane.scales[c] = scale
                except Unusable as e:
                    lane.accepted.remove(c)
                    outcomes.append(Outcome(c, e))
                    outcomes.extend(self._rebuild(lane))
        return outcomes

    def collected(self, parameters: frozenset[str], late: bool = True) -> Collected:
        """What was taken in (with the late updates, or the on-time ones alone), for the rule
        (fedsync/aggregation/rules.py), which consumes it: the lanes' sums are merged into a new one (one model's
        memory), so collecting again gives the same."""
        groups = (False, True) if late else (False,)
        used = [lane.groups[g] for lane in self.lanes for g in groups if g in lane.groups and lane.groups[g].count]
        if not used:
            raise ValueError("no accepted updates to aggregate")
        total = WeightedSum(self.layout)
        for part in used:
            total.merge(part)
        accepted = [c for c in self.accepted if late or not self.late(c)]
        return Collected(total, [(c.weight, c.steps) for c in accepted], parameters,
                         UpdateSlices(self.store, accepted, self.file_layout, self.scales))

    def close(self) -> None:
        self.pool.shutdown(wait=False)


class UpdateSlices:
    """Aligned slices of accepted update files, read from the share when a coordinate-wise rule asks: memory
    O(updates x slice), never O(updates x model), decoded from each file's encoding. The files were verified whole
    when they were taken in."""

    def __init__(self, store: Store, accepted: list[Candidate], layout: FileLayout,
                 scales: dict[Candidate, float] | None = None) -> None:
        self.store, self.accepted, self.layout = store, accepted, layout
        self.scales = scales or {}  # clipped updates: their floating tensors read times this
        self.offsets: list[dict[str, int]] | None = None  # per file: tensor name -> its first byte in the file

    def count(self) -> int:
        return len(self.accepted)

    def read(self, tensor: str, start: int, length: int) -> torch.Tensor:
        dtype = DTYPES[self.layout[tensor][0]]
        offsets = self._offsets()
        out = torch.empty((len(self.accepted), length), dtype=dtype)
        for i, c in enumerate(self.accepted):
            with self.store.open(c.name, follow_links=False) as f:
                if not dtype.is_floating_point or c.encoding == NONE:
                    f.seek(offsets[i][tensor] + start * dtype.itemsize)
                    _read_exact(f, memoryview(out[i].view(torch.uint8).numpy()))
                elif c.encoding == "bf16":
                    values = torch.empty(length, dtype=torch.bfloat16)
                    f.seek(offsets[i][tensor] + start * 2)
                    _read_exact(f, memoryview(values.view(torch.uint8).numpy()))
                    out[i] = values
                else:  # int8: the values and the scales of the blocks they lie in (start is a multiple of BLOCK)
                    q = torch.empty(length, dtype=torch.int8)
                    f.seek(offsets[i][tensor] + start)
                    _read_exact(f, memoryview(q.numpy()))
                    scales = torch.empty(blocks(length), dtype=torch.float32)
                    f.seek(offsets[i][scale_name(tensor)] + start // BLOCK * 4)
                    _read_exact(f, memoryview(scales.view(torch.uint8).numpy()))
                    out[i] = dequantize(q, scales)
            if c in self.scales and dtype.is_floating_point:
                out[i] *= self.scales[c]
        return out

    def _offsets(self) -> list[dict[str, int]]:
        if self.offsets is None:
            self.offsets = []
            for c in self.accepted:
                with self.store.open(c.name, follow_links=False) as f:
                    prefix = bytearray(8)
                    _read_exact(f, memoryview(prefix))
                    header = bytearray(header_length(bytes(prefix), f.size))
                    _read_exact(f, memoryview(header))
                    specs = parse_header(bytes(header), f.size - 8 - len(header))
                self.offsets.append({s.name: 8 + len(header) + s.start for s in specs})
        return self.offsets
