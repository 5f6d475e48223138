"""A worker's round of DP-SGD (Abadi et al. 2016) through Opacus: batches drawn by Poisson sampling at rate
batch_size / examples, each example's gradient clipped to `max_grad_norm`, Gaussian noise of noise_multiplier x
max_grad_norm added to each batch's summed gradient. Opacus wraps the model for the round and lets go of it after,
so the worker's model stays a plain module between rounds.

It trains in fp32, eagerly: per-example gradients take Opacus's hooks, which CUDA graphs and autocast do not carry.
The privacy it gives is counted by the caller (fedsync/run/working/private.py): one Poisson-sampled Gaussian step
per optimizer step."""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsync.base.errors import ConfigError, DataError
from fedsync.learning.data import Source, Split
from fedsync.learning.train import TrainResult, TrainSettings


def refusals(model: nn.Module) -> list[str]:
    """What Opacus cannot train privately in this model (BatchNorm, some recurrent layers), in its own words."""
    try:
        from opacus.validators import ModuleValidator
    except ImportError:
        raise ConfigError("worker_dp trains with Opacus, which is not installed here: pip install 'fedsync[dp]' "
                          "(or opacus)") from None

    return [str(e) for e in ModuleValidator.validate(model, strict=False)]


def dp_local_train(model: nn.Module, data: Source, settings: TrainSettings, noise_multiplier: float,
                   max_grad_norm: float, device: str, seed: int) -> tuple[TrainResult, float]:
    """DP-SGD over the shard for `settings.steps` steps, or `settings.epochs` passes; the result and the sampling
    rate its steps were drawn at."""
    if not isinstance(data, Split):
        raise DataError("worker_dp trains on a shard held in memory (Poisson sampling draws from all of it); this "
                        "worker's data is read as a stream: give it a larger --memory-budget")
    if settings.prox_mu > 0:
        raise ConfigError("worker_dp does not combine with prox_mu: the proximal term is not a per-example gradient")
    problems = refusals(model)
    if problems:
        raise ConfigError(f"Opacus cannot train model {type(model).__name__} privately: {problems[0]}")
    started = time.perf_counter()
    model.to(device).train()
    with warnings.catch_warnings():  # secure_mode off (README, "Privacy"); hooks on a first layer without input grad
        warnings.simplefilter("ignore")
        return _train(model, data, settings, noise_multiplier, max_grad_norm, device, seed, started)


def _train(model: nn.Module, data: Split, settings: TrainSettings, noise_multiplier: float, max_grad_norm: float,
           device: str, seed: int, started: float) -> tuple[TrainResult, float]:
    from opacus import PrivacyEngine

    n = len(data)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    loader = DataLoader(TensorDataset(data.x, data.y), batch_size=settings.batch_size,
                        generator=torch.Generator().manual_seed(seed))
    private, dp_optimizer, dp_loader = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    total_steps = settings.steps if settings.steps is not None else settings.epochs * len(dp_loader)
    loss_sum, processed, step = 0.0, 0, 0
    try:
        while step < total_steps:
            for xb, yb in dp_loader:
                xb, yb = xb.to(device), yb.to(device)
                if settings.augment is not None and len(yb):
                    xb = settings.augment(xb, generator)
                dp_optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(private(xb), yb) if len(yb) else private(xb).sum() * 0.0
                loss.backward()
                dp_optimizer.step()
                loss_sum += float(loss.detach()) * len(yb)
                processed += len(yb)
                step += 1
                if step >= total_steps:
                    break
    finally:
        private._close()  # the hooks and per-example gradients go: the worker's model is plain again
    rate = 1.0 / len(dp_loader)
    result = TrainResult(samples=n, steps=total_steps, processed=processed, seconds=time.perf_counter() - started,
                         train_loss=loss_sum / max(processed, 1))
    return result, rate
