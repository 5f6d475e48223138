"""Local training and evaluation, read top to bottom.

The loop keeps an accelerator busy: the shard sits on the device when it fits, batches are drawn and
augmented there with the device's own random generator, the loss is summed on the device, and nothing waits
for the device until the round's last step. Mixed precision is autocast (bf16, or fp16 with a gradient scaler).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from fedsync.base.errors import DataError
from fedsync.learning.capture import begin_step
from fedsync.learning.data import Source, Split
from fedsync.learning.pace import Pace
from fedsync.learning.sgd import ForeachSGD

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
Report = Callable[[int, int, float, float], None]  # (steps done, steps in all, mean loss so far, samples/s)
REPORT_EVERY_S = 0.5  # a report reads the loss, which waits for the device: at most this often
IGNORE = -100  # cross-entropy's ignore_index: a label that counts for nothing (past a text's end: learning/text.py)


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    augment: Augment | None  # the task's augmentation of a batch on the device, or None for none
    steps: int | None = None     # optimizer steps to take instead of `epochs` passes (balance: throughput)
    prox_mu: float = 0.0         # FedProx: pull towards the round's global model with (mu / 2) * ||w - w0||^2
    precision: str = "fp32"      # fp32 | bf16 | fp16, already resolved for the device
    channels_last: bool = False  # NHWC memory layout, faster for convolutions on tensor cores


@dataclass(frozen=True)
class TrainResult:
    samples: int       # distinct examples trained on: FedAvg's weight ("samples actually used")
    steps: int         # optimizer steps taken: FedNova's normalisation
    processed: int     # examples processed, repeats included
    seconds: float     # wall time of the loop, device work included
    train_loss: float  # mean loss over every example processed

    @property
    def samples_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def fits_on(device: str, nbytes: int) -> bool:
    """Whether a shard of this size may live on the device: at most half its free memory."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return nbytes <= free // 2
    return True


def place(data: Source, device: str) -> Source:
    """The shard on the device when it fits there; else in pinned host memory, copied batch by batch. A stream
    stays what it is: its batches are read from files as they are needed."""
    if not isinstance(data, Split) or data.x.device == torch.device(device):
        return data  # a stream, or placed already (the worker keeps its shard there across rounds)
    if fits_on(device, data.x.nbytes + data.y.nbytes):
        return Split(data.x.to(device), data.y.to(device))
    pin = device.startswith("cuda")
    return Split(data.x.pin_memory() if pin else data.x, data.y.pin_memory() if pin else data.y)


def local_train(model: nn.Module, data: Source, settings: TrainSettings, device: str, seed: int,
                captured: nn.Module | None = None, report: Report | None = None) -> TrainResult:
    """SGD over the shard for `settings.steps` steps, or `settings.epochs` passes, from the model's weights.
    `captured` (fedsync/learning/capture.py) runs the full batches; partial ones run eagerly on `model`. `report`,
    when given, hears how far it got every REPORT_EVERY_S seconds."""
    started = time.perf_counter()
    kind = device.split(":")[0]
    memory_format = torch.channels_last if settings.channels_last else torch.preserve_format
    model.to(device, memory_format=memory_format).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "cuda" or settings.precision == "fp16":  # fused: one kernel per step; fp16's GradScaler needs torch's
        optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                    weight_decay=settings.weight_decay, fused=kind == "cuda" or None)
    else:  # the same update without importing torch._dynamo (fedsync/learning/sgd.py)
        optimizer = ForeachSGD(params, settings.lr, settings.momentum, settings.weight_decay)
    scaler = torch.amp.GradScaler(kind, enabled=settings.precision == "fp16")
    anchors = [p.detach().clone() for p in params] if settings.prox_mu > 0 else []
    generator = torch.Generator(device=device).manual_seed(seed)
    data = place(data, device)
    order_generator = generator if data.device.type == kind else torch.Generator().manual_seed(seed)
    n = len(data)
    total_steps = settings.steps if settings.steps is not None else settings.epochs * -(-n // settings.batch_size)
    loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per batch
    processed = 0
    pace = Pace(device)
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(())
    next_report = time.perf_counter() + REPORT_EVERY_S
    for step in range(total_steps):
        batch = next(batches, None)
        if batch is None:  # the next pass over the data, in a new order
            batches = data.epoch(settings.batch_size, order_generator)
            batch = next(batches, None)
            if batch is None:
                raise DataError(f"no example of the {n} given could be read for training")
        xb, yb = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if settings.augment is not None:
            xb = settings.augment(xb, generator)
        xb = xb.contiguous(memory_format=memory_format)
        full = captured is not None and len(yb) == settings.batch_size
        if full and xb.is_cuda:  # CUDA graphs exist only there (and the call imports the graph machinery)
            begin_step()
        with torch.autocast(kind, dtype=AUTOCAST.get(settings.precision), enabled=settings.precision in AUTOCAST):
            loss = F.cross_entropy((captured if full else model)(xb), yb)  # type: ignore[operator]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if anchors:  # FedProx's gradient term mu * (w - w0), added to the unscaled gradients
            scaler.unscale_(optimizer)
            torch._foreach_add_([p.grad for p in params], torch._foreach_sub(params, anchors), alpha=settings.prox_mu)
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach().float() * len(yb)
        processed += len(yb)
        pace.step()
        if report is not None and time.perf_counter() >= next_report:
            elapsed = time.perf_counter() - started
            report(step + 1, total_steps, float(loss_sum) / processed, processed / elapsed)
            next_report = time.perf_counter() + REPORT_EVERY_S
    train_loss = float(loss_sum) / max(processed, 1)  # the one wait for the device
    return TrainResult(samples=min(n, processed), steps=total_steps, processed=processed,
                       seconds=time.perf_counter() - started, train_loss=train_loss)


def measure_throughput(model: nn.Module, data: Source, settings: TrainSettings, device: str,
                       seconds: float = 0.5, captured: nn.Module | None = None) -> float:
    """Training samples per second on this device: one warm-up step, then doubling step counts until a run
    lasts a third of `seconds`, then that run twice more; the fastest of the three. A machine's other work (a
    process starting beside it) only ever slows a run down, so the fastest is the nearest to what the device does,
    and a worker that measured during a burst is not given a third of its share of the first round.
    Trains `model` in place: its weights are not worth keeping afterwards."""
    local_train(model, data, replace(settings, steps=1), device, seed=0, captured=captured)
    steps = 2
    while True:
        result = local_train(model, data, replace(settings, steps=steps), device, seed=steps, captured=captured)
        if result.seconds >= seconds / 3 or steps >= 256:
            break
        steps *= 2
    repeats = [local_train(model, data, replace(settings, steps=steps), device, seed=steps + i, captured=captured)
               for i in (1, 2)]
    return max(r.samples_per_s for r in [result, *repeats])


@torch.no_grad()
def evaluate(model: nn.Module, data: Source, batch_size: int, device: str = "cpu") -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over the examples' labels (of a stream: those that could be read): one per
    image, one per token of a text (labels IGNORE are not counted)."""
    model.to(device).eval()
    loss_sum, correct, seen = 0.0, 0, 0
    pace = Pace(device)
    for x, y in data.epoch(batch_size):
        xb, yb = x.to(device), y.to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
        seen += int(yb.ne(IGNORE).sum())
        pace.step()
    if not seen:
        raise DataError(f"no example of the {len(data)} given could be read for evaluation")
    return loss_sum / seen, correct / seen
