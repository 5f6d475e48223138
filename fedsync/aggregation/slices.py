"""Aligned slices of the accepted update files, for the coordinate-wise rules (median, trimmed mean): read from the
share when a rule asks, decoded from each file's encoding, memory O(updates x slice)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

from fedsync.aggregation.candidates import Candidate
from fedsync.storage.sealing import SealedReader, SealingIdentity
from fedsync.storage.store import Reader, Store, read_exact
from fedsync.storage.tensorfile import FileLayout, read_header
from fedsync.tensors.encoding import BLOCK, NONE, blocks, dequantize, scale_name
from fedsync.tensors.files import DTYPES


class UpdateSlices:
    """Aligned slices of accepted update files, read from the share when a coordinate-wise rule asks: memory
    O(updates x slice), never O(updates x model), decoded from each file's encoding. The files were verified whole
    when they were taken in."""

    def __init__(self, store: Store, accepted: list[Candidate], layout: FileLayout,
                 scales: dict[Candidate, float] | None = None, opener: SealingIdentity | None = None) -> None:
        self.store, self.accepted, self.layout, self.opener = store, accepted, layout, opener
        self.scales = scales or {}  # clipped updates: their floating tensors read times this
        self.offsets: list[dict[str, int]] | None = None  # per file: tensor name -> its first byte in the file
        self.held: threading.local | None = None  # during a pass: each thread's open files
        self.stacks: list[ExitStack] = []  # every thread's, closed when the pass ends
        self.lock = threading.Lock()

    @contextmanager
    def reading(self) -> Iterator[None]:
        """A pass over the slices: each thread that reads opens every file once (a sealed one's key unwrapped
        once), not once a slice."""
        self._offsets()
        self.held = threading.local()
        try:
            yield
        finally:
            self.held = None
            with self.lock:
                stacks, self.stacks = self.stacks, []
            for stack in stacks:
                stack.close()

    def count(self) -> int:
        return len(self.accepted)

    def read(self, tensor: str, start: int, length: int) -> torch.Tensor:
        dtype = DTYPES[self.layout[tensor][0]]
        offsets = self._offsets()
        out = torch.empty((len(self.accepted), length), dtype=dtype)
        for i, c in enumerate(self.accepted):
            with self._file(i) as f:
                if not dtype.is_floating_point or c.encoding == NONE:
                    f.seek(offsets[i][tensor] + start * dtype.itemsize)
                    read_exact(f, memoryview(out[i].view(torch.uint8).numpy()))
                elif c.encoding == "bf16":
                    values = torch.empty(length, dtype=torch.bfloat16)
                    f.seek(offsets[i][tensor] + start * 2)
                    read_exact(f, memoryview(values.view(torch.uint8).numpy()))
                    out[i] = values
                else:  # int8: the values and the scales of the blocks they lie in (start is a multiple of BLOCK)
                    q = torch.empty(length, dtype=torch.int8)
                    f.seek(offsets[i][tensor] + start)
                    read_exact(f, memoryview(q.numpy()))
                    scales = torch.empty(blocks(length), dtype=torch.float32)
                    f.seek(offsets[i][scale_name(tensor)] + start // BLOCK * 4)
                    read_exact(f, memoryview(scales.view(torch.uint8).numpy()))
                    out[i] = dequantize(q, scales)
            if c in self.scales and dtype.is_floating_point:
                out[i] *= self.scales[c]
        return out

    def _offsets(self) -> list[dict[str, int]]:
        if self.offsets is None:
            self.offsets = []
            for c in self.accepted:
                with self._open(c) as f:
                    data, specs = read_header(f)
                self.offsets.append({s.name: data + s.start for s in specs})
        return self.offsets

    @contextmanager
    def _file(self, i: int) -> Iterator[Reader]:
        """The i-th file: held open by this thread during a pass, else opened for this read."""
        held = self.held
        if held is None:
            with self._open(self.accepted[i]) as f:
                yield f
            return
        if not hasattr(held, "files"):
            held.stack, held.files = ExitStack(), {}
            with self.lock:
                self.stacks.append(held.stack)
        if i not in held.files:
            held.files[i] = held.stack.enter_context(self._open(self.accepted[i]))
        yield held.files[i]

    @contextmanager
    def _open(self, c: Candidate) -> Iterator[Reader]:
        """The update's tensor file, or its plaintext when it is sealed: only the chunks a read touches are
        decrypted, each checked by its tag."""
        with self.store.open(c.name, follow_links=False) as f:
            if c.sealed:
                assert self.opener is not None, "a sealed update was accepted without a key to open it"
                yield SealedReader(f, self.opener).start()
            else:
                yield f
