"""Averaged weights for evaluation: an exponential moving average of the parameters.

AWD-LSTM evaluates with the average of the iterates (NT-ASGD); an exponential moving average started
at a given step is the same idea without the switch of optimiser, and it works with Adam. Training
goes on with the raw weights; evaluation and the ``best`` checkpoint use the average::

    avg = WeightAverage(model, decay=0.999, start=1000)
    ...after every optimiser step:  avg.update(step)      # step counted after the update (1, 2, ...)
    with avg.swapped(model):                               # the model holds the average inside
        evaluate(model)

Before ``start`` (and while no update has happened) the average is the model itself. The average is
state to resume: :meth:`tensors` / :meth:`load_tensors` round-trip it through the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from deeprnn.errors import ConfigError


class WeightAverage:
    """EMA of ``model``'s floating-point parameters: ``avg ← decay·avg + (1 − decay)·w`` each step."""

    PREFIX = "avg."  # names of its tensors in a checkpoint's training state

    def __init__(self, model: nn.Module, decay: float, start: int = 0):
        if not 0 < decay < 1:
            raise ConfigError(f"decay must be in (0, 1), got {decay}")
        self.decay, self.start = float(decay), int(start)
        self.names = [n for n, p in model.named_parameters() if p.is_floating_point()]
        self.params = dict(model.named_parameters())
        self.avg: dict[str, torch.Tensor] | None = None  # None until the first update at or after start

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the current weights; ``step`` is the number of optimiser steps done so far."""
        if step < self.start:
            return
        if self.avg is None:
            self.avg = {n: self.params[n].detach().clone() for n in self.names}
            return
        for n in self.names:
            self.avg[n].lerp_(self.params[n].detach(), 1 - self.decay)

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block ``model`` holds the averaged weights; the raw ones come back after."""
        if self.avg is None:
            yield model
            return
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.names}
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(self.avg[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n in self.names:
                    params[n].copy_(saved[n])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The average as ``{"avg.<name>": tensor}`` (empty before it starts)."""
        if self.avg is None:
            return {}
        return {self.PREFIX + n: t for n, t in self.avg.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`tensors` output (other entries are ignored)."""
        found = {k[len(self.PREFIX):]: v for k, v in tensors.items() if k.startswith(self.PREFIX)}
        if not found:
            self.avg = None
            return
        self.avg = {n: found[n].to(device=self.params[n].device, dtype=self.params[n].dtype).clone()
                    for n in self.names}
