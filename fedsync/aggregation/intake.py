"""Taking in updates: each file is read once, in pieces, and each piece is hashed, checked, measured (its share
of the L2 norm screening uses) and added while it is still in the CPU cache. That single pass is what lets a
2-core machine aggregate faster than it can hash with SHA-256 (see docs/BENCHMARKS.md).

Adding before the whole-file hash is known is speculative: a lane (one thread with its own running sum)
that added part of a file which then fails is rebuilt from its accepted updates, re-verified. So the result
is always the aggregate of exactly the valid updates, and a bad file costs time, never correctness.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NoReturn

import torch

from fedsync.aggregation.candidates import Candidate, Outcome
from fedsync.aggregation.geometry import torch_threads
from fedsync.aggregation.rules import Collected
from fedsync.aggregation.slices import UpdateSlices
from fedsync.aggregation.sums import WeightedSum, accumulator_dtype
from fedsync.aggregation.validity import Validity
from fedsync.base.machine import cores, free_memory
from fedsync.storage import names
from fedsync.storage.hashing import Hasher
from fedsync.storage.reasons import Reason, Unusable
from fedsync.storage.sealing import SealedReader, SealingIdentity, hash_rest
from fedsync.storage.store import LinkRefused, Reader, Signature, Store, read_upto
from fedsync.storage.tensorfile import FileLayout, TensorSpec, check_layout, header_length, parse_header
from fedsync.tensors.encoding import (
    BLOCK,
    ENCODINGS,
    SCALE_SUFFIX,
    dequantize,
    encoded_layout,
    scale_name,
)
from fedsync.tensors.files import DTYPES, SPELLING, Layout, file_layout

PIECE_BYTES = 1 << 20  # few calls per GB, cache-sized (256 KiB-8 MiB measured no better); a multiple of each dtype
SUMS_SHARE = 4  # the lanes' running sums take at most 1/SUMS_SHARE of the memory free when an intake starts


def intake_lanes(one_sum: int, cpus: int, free: int) -> int:
    """Lanes (threads, each with its own running sum of `one_sum` bytes) an intake reads on: one per core, as long
    as their sums fit in a quarter of the `free` memory (the image-folder cache's share too); always at least one.
    Lanes are what let decryption and hashing, each bound to one core, run at the machine's pace."""
    return max(1, min(cpus, free // SUMS_SHARE // max(1, one_sum)))


def running_sum_bytes(layout: Layout) -> int:
    """The memory of one running sum of `layout` (fedsync/aggregation/sums.py)."""
    return sum(math.prod(shape) * accumulator_dtype(dt).itemsize for dt, shape in layout.values())


def machine_lanes(layout: Layout) -> int:
    """intake_lanes for sums of `layout` on this machine, now: what an Aggregator reads on unless told."""
    return intake_lanes(running_sum_bytes(layout), cores(), free_memory())


@dataclass
class _Lane:
    layout: Layout
    groups: dict[bool, WeightedSum] = field(default_factory=dict)  # late? -> the running sum of those updates
    accepted: list[Candidate] = field(default_factory=list)
    norms: dict[Candidate, float] = field(default_factory=dict)
    scales: dict[Candidate, float] = field(default_factory=dict)  # clipped updates: their floats count x scale
    signatures: dict[Candidate, object] = field(default_factory=dict)  # each file's, taken once it was verified
    piece: bytearray = field(default_factory=lambda: bytearray(PIECE_BYTES))
    floats: torch.Tensor = field(default_factory=lambda: torch.empty(PIECE_BYTES, dtype=torch.float32))  # int8, decoded

    def running_sum(self, late: bool) -> WeightedSum:
        if late not in self.groups:
            self.groups[late] = WeightedSum(self.layout)
        return self.groups[late]


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


class PartlyAdded(Exception):
    """A file failed after part of it was summed: the lane that read it must be rebuilt (Aggregator._rebuild)."""

    def __init__(self, problem: Unusable) -> None:
        super().__init__(problem.detail)
        self.problem = problem


@dataclass
class _Reading:
    """One pass over one update file: the hash and sum of squares so far, and the first problem found (reading
    goes on after it, hashing only: a hash mismatch means "not synced yet", not "bad"). The hash is over the file's
    bytes as they are in the share; a sealed file's tensors are read from its plaintext (`source`)."""

    c: Candidate
    raw: Reader
    hasher: Hasher = field(default_factory=Hasher)
    squares: float = 0.0
    problem: Unusable | None = None
    added: bool = False
    source: Reader | None = None  # where tensors are read from: the file itself, or its plaintext when sealed
    sealed: SealedReader | None = None
    whole: bool = True  # the hasher takes every byte of the file; False: a sealed file's head alone (its `head`)

    @property
    def expected(self) -> str:
        """What the hasher's digest must be: the file's BLAKE3, or the sealed file's head's."""
        return self.c.ref.blake3 if self.whole or self.c.head is None else self.c.head

    def begin(self, opener: SealingIdentity | None) -> Reader:
        if self.raw.size != self.c.ref.bytes:
            raise Unusable(Reason.SIZE_MISMATCH, f"{self.raw.size} bytes, the marker says {self.c.ref.bytes}")
        if not self.c.sealed:
            self.source = self.raw
        elif opener is None:
            raise Unusable(Reason.UNDECRYPTABLE, "sealed, but this coordinator was given no key to open it")
        else:
            self.whole = self.c.head is None  # with a head, the payload's tags prove the rest of the bytes
            self.sealed = SealedReader(self.raw, opener, self.hasher, whole=self.whole)
            self.source = self.sealed.start()
        return self.source

    def read_upto(self, view: memoryview) -> int:
        assert self.source is not None
        n = read_upto(self.source, view)
        if self.source is self.raw:
            self.hasher.update(view[:n])
        return n

    def read(self, view: memoryview) -> None:
        if self.read_upto(view) < len(view):
            raise Unusable(Reason.SIZE_MISMATCH, "the file ended early (truncated while being read)")

    def rest(self, piece: memoryview) -> None:
        """Hash what is left of the file without using it (after an unusable header or a chunk that failed): the
        whole file's hash then tells a file not synced yet from a bad one."""
        hashed = self.sealed.hashed if self.sealed else 0 if self.c.sealed else self.raw.tell()
        hash_rest(self.raw, self.hasher, hashed, piece)
        self.whole = True


def fold(c: Candidate, store: Store, layout: FileLayout, sums: WeightedSum, piece: bytearray,
         floats: torch.Tensor, scale: float = 1.0, whole: bool = True, validity: Validity | None = None,
         opener: SealingIdentity | None = None) -> float:
    """Read c's tensor file once (`layout`: what its encoding holds), adding the decoded delta to `sums` (its floating
    tensors times `scale`; without `whole` only those, and it is not counted again: a correction of an update
    already added). `validity` checks the constrained buffers against the round's global model (invalid_state);
    `opener` opens a sealed file. Raises Unusable when it does not count, PartlyAdded when part of it was summed
    already (the caller then rebuilds `sums`). Returns the update's L2 norm over its floating tensors (decoded),
    unscaled. `floats` holds an int8 piece's decoded values."""
    short = names.basename(c.name)
    reading: _Reading | None = None
    try:
        with store.open(c.name, follow_links=False) as f:
            reading = _Reading(c, f)
            try:
                _fold_file(reading, reading.begin(opener), layout, sums, piece, floats, scale, whole, validity)
            except Unusable as e:
                if not c.sealed or e.reason == Reason.SIZE_MISMATCH and reading.source is None:
                    raise
                reading.problem = e  # a sealed file that does not open: bad, or only not synced yet (its hash says)
                reading.rest(memoryview(piece))
    except FileNotFoundError:
        raise Unusable(Reason.MISSING_FILE, f"{short} is not there (yet)") from None
    except LinkRefused:
        raise Unusable(Reason.BAD_PATH, f"{short} is a symbolic link") from None
    except Unusable as e:
        _fail(reading, e)
    except OSError as e:
        _fail(reading, Unusable(Reason.IO_ERROR, f"{short}: {e.strerror or e}"))
    assert reading is not None
    if reading.hasher.hexdigest() != reading.expected:
        reading.problem = Unusable(Reason.HASH_MISMATCH, "the file's BLAKE3 differs from the marker's" if reading.whole
                                   else "its header's BLAKE3 differs from the marker's sealed_head")
    if reading.problem is not None:
        _fail(reading, reading.problem)
    if whole:
        sums.add_weight(c.weight)
    return math.sqrt(reading.squares)


def _fail(reading: _Reading | None, problem: Unusable) -> NoReturn:
    if reading is not None and reading.added:
        raise PartlyAdded(problem) from None
    raise problem from None


def _fold_file(reading: _Reading, f: Reader, layout: FileLayout, sums: WeightedSum, piece: bytearray,
               floats: torch.Tensor, scale: float, whole: bool, validity: Validity | None) -> None:
    """The safetensors header of `f` (the file, or its plaintext), then each tensor's pieces; after an unusable
    header the rest is only hashed."""
    first = bytearray(8)
    prefix = bytes(first[:reading.read_upto(memoryview(first))])
    specs: list[TensorSpec] = []
    try:
        header = bytearray(header_length(prefix, f.size))
        reading.read(memoryview(header))
        specs = parse_header(bytes(header), f.size - 8 - len(header))
        check_layout(specs, layout, SPELLING)
    except Unusable as e:
        reading.problem, specs = e, []
    scales: dict[str, torch.Tensor] = {}  # int8: each tensor's block scales, read before its values
    for spec in specs:
        _fold_tensor(reading, spec, layout, scales, sums, piece, floats, scale, whole, validity)
    if not specs:  # the header was unusable: hash the rest to tell corrupt from unsynced
        reading.rest(memoryview(piece))


def _fold_tensor(reading: _Reading, spec: TensorSpec, layout: FileLayout, scales: dict[str, torch.Tensor],
                 sums: WeightedSum, piece: bytearray, floats: torch.Tensor, scale: float, whole: bool,
                 validity: Validity | None) -> None:
    """One tensor, piece by piece: each decoded, checked finite, measured and added while it is in the cache."""
    c, view = reading.c, memoryview(piece)
    dtype = DTYPES[spec.dtype]
    offset, left = 0, spec.end - spec.start
    scale_of = spec.name[:-len(SCALE_SUFFIX)] if c.encoding == "int8" and spec.name.endswith(SCALE_SUFFIX) else None
    quantized = c.encoding == "int8" and scale_name(spec.name) in layout
    scale_bytes = bytearray()
    while left:
        m = min(PIECE_BYTES, left)
        reading.read(view[:m])
        left -= m
        if reading.problem is not None:
            continue  # keep hashing: a hash mismatch means "not synced yet", not "bad"
        if scale_of is not None:
            scale_bytes += view[:m]
            continue
        values = torch.frombuffer(piece, dtype=dtype, count=m // dtype.itemsize)
        if quantized:
            if spec.name not in scales:
                reading.problem = Unusable(Reason.BAD_ENCODING, f"{spec.name}'s int8 values come before its "
                                                                f"scales {scale_name(spec.name)}")
                continue
            values = dequantize(values, scales[spec.name][offset // BLOCK:], floats)
        square = _square_sum(values) if values.is_floating_point() else 0.0
        if math.isnan(square):
            reading.problem = Unusable(Reason.NON_FINITE, f"{spec.name} holds NaN or infinite values")
            continue
        if whole and validity is not None and spec.name in validity:
            why = validity.check_piece(spec.name, offset, values, c.steps, c.encoding)
            if why is not None:
                reading.problem = Unusable(Reason.INVALID_STATE, why)
                continue
        reading.squares += square
        if values.is_floating_point():
            sums.add_piece(spec.name, offset, values, c.weight * scale)
        elif whole:
            sums.add_piece(spec.name, offset, values, c.weight)
        reading.added = True
        offset += values.numel()
    if scale_of is not None and reading.problem is None:
        try:
            scales[scale_of] = _scales(scale_bytes, spec.name)
        except Unusable as e:
            reading.problem = e


def _problem(e: Unusable | PartlyAdded) -> Unusable:
    return e.problem if isinstance(e, PartlyAdded) else e


class Aggregator:
    """Streaming intake of round `round`'s updates, fed in batches as their markers appear: each verified and added
    to a weighted sum with its rule weight. Late updates (trained for an earlier round) are summed apart, so the
    round's aggregate can be taken with them or without (a server optimizer's state learns from the on-time ones)."""

    def __init__(self, layout: Layout, store: Store, lanes: int | None = None, round: int = 0,
                 validity: Validity | None = None, opener: SealingIdentity | None = None) -> None:
        """`lanes`: reading threads (none: machine_lanes); `opener`: the coordinator's key for sealed updates (none: a
        sealed one is undecryptable)."""
        if lanes is None:
            lanes = machine_lanes(layout)
        self.layout, self.store, self.file_layout, self.round = layout, store, file_layout(layout), round
        self.opener = opener
        self.validity = validity or Validity()  # checked on this round's updates
        self.late_validity = Validity(counts=self.validity.counts)  # a late one's variances had another base
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
        with torch_threads(1):
            results = list(self.pool.map(self._run_lane, self.lanes, plan))
        return [o for lane_outcomes in results for o in lane_outcomes]

    def _run_lane(self, lane: _Lane, batch: list[Candidate]) -> list[Outcome]:
        outcomes, dirty = [], False
        for c in batch:
            try:
                lane.norms[c] = fold(c, self.store, self.layouts[c.encoding], lane.running_sum(self.late(c)),
                                     lane.piece, lane.floats, validity=self._validity(c), opener=self.opener)
                # after the read: a synced copy renamed into place while the marker waited is the file verified
                lane.signatures[c] = self.store.signature(c.name)
                lane.accepted.append(c)
                outcomes.append(Outcome(c))
            except Unusable as e:
                outcomes.append(Outcome(c, e))
            except PartlyAdded as e:
                dirty = True
                outcomes.append(Outcome(c, e.problem))
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
                                         lane.piece, lane.floats, lane.scales.get(c, 1.0), validity=self._validity(c),
                                         opener=self.opener)
                except (Unusable, PartlyAdded) as e:
                    lane.accepted.remove(c)
                    lane.scales.pop(c, None)
                    dropped.append(Outcome(c, _problem(e)))
                    break
            else:
                return dropped

    def late(self, c: Candidate) -> bool:
        return c.round != self.round

    def _validity(self, c: Candidate) -> Validity:
        """A late update's variances were relative to an older model: only its counts are checked."""
        return self.late_validity if self.late(c) else self.validity

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
        """Scale every accepted update whose L2 norm (as it counts now) is over `bound` down to it: one more read of
        each such file adds the difference, (bound / norm - its scale so far) x its floats. A file that changed in
        between is dropped (outcome) and its lane rebuilt."""
        outcomes: list[Outcome] = []
        for lane in self.lanes:
            while over := [c for c in lane.accepted if lane.norms[c] * lane.scales.get(c, 1.0) > bound * (1 + 1e-9)]:
                c = over[0]
                scale = bound / lane.norms[c]
                try:
                    with torch_threads(1):
                        fold(c, self.store, self.layouts[c.encoding], lane.running_sum(self.late(c)), lane.piece,
                             lane.floats, scale - lane.scales.get(c, 1.0), whole=False, opener=self.opener)
                    lane.scales[c] = scale
                except (Unusable, PartlyAdded) as e:
                    lane.accepted.remove(c)
                    lane.scales.pop(c, None)
                    outcomes.append(Outcome(c, _problem(e)))
                    outcomes.extend(self._rebuild(lane))
        return outcomes

    def unchanged(self) -> list[Outcome]:
        """Take out each accepted update whose file changed or went away since it was read (a worker rewrote or
        removed it): the bytes that were verified are gone, and the rules that read the files again (slices) would
        see others. A file written again with the very bytes the marker names (a sync tool re-delivering it after a
        partition heals: a new inode, the same content) still counts. FileNotFoundError when its round's folder is
        gone too: the share itself is away (unmounted), which the caller waits out."""
        changed: dict[Candidate, Unusable] = {}
        for lane in self.lanes:
            for c in lane.accepted:
                now = self.store.signature(c.name)
                if now is None and not self.store.exists(names.updates_dir(c.round)):
                    raise FileNotFoundError(f"{names.updates_dir(c.round)} is not there: is the share unmounted?")
                if now is None:
                    changed[c] = Unusable(Reason.MISSING_FILE, "its tensor file went away after it was accepted")
                elif now != lane.signatures.get(c):
                    if self._same_bytes(c, now):
                        lane.signatures[c] = now
                        continue
                    changed[c] = Unusable(Reason.DUPLICATE, "its tensor file changed after it was accepted: the "
                                                            "verified bytes are gone, so it no longer counts")
        return self.drop(changed) if changed else []

    def _same_bytes(self, c: Candidate, signature: Signature) -> bool:
        """Whether the file (as it is now, and still with `signature` after the read) holds the bytes its marker
        names."""
        hasher = Hasher()
        try:
            with self.store.open(c.name) as raw:
                hash_rest(raw, hasher, 0, memoryview(bytearray(1 << 22)))
        except OSError:
            return False
        return hasher.hexdigest() == c.ref.blake3 and self.store.signature(c.name) == signature

    def slices(self) -> UpdateSlices:
        """Aligned slices of every accepted file (clipped ones scaled), in the order of `accepted`."""
        return UpdateSlices(self.store, self.accepted, self.file_layout, self.scales, self.opener)

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
                         UpdateSlices(self.store, accepted, self.file_layout, self.scales, self.opener))

    def close(self) -> None:
        self.pool.shutdown(wait=False)
