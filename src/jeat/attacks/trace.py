"""Per-point loss traces of gradient attacks: what :mod:`jeat.diagnose` reads to say *why* an
attack failed.

A :class:`LossTrace` is handed to an attack (``attack.recorder = trace``) before it runs. The
attack then writes, for every point of the batch and every run (a restart, or one target class
of a multi-targeted attack):

* the attack loss of every iterate (``steps + 1`` values: the iterates ``x_0 .. x_T``),
* the size (L∞ norm) of the input gradient at every step,
* the first step at which an iterate fooled the model (``-1``: never).

Recording never waits for the device: values are written into buffers on the attack's device
with indexed stores, and copied to the host once per batch (:meth:`LossTrace.end_batch`), where
the evaluation already synchronises. Points that left an active-set attack early keep ``nan``
for the steps they skipped.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["LossTrace", "last_finite"]


class LossTrace:
    """Loss, gradient size and first success per point, run and step, for ``n`` points.

    ``runs`` is how many runs one point can get (restarts × target classes) and ``steps`` the
    attack's step count. Host tensors, filled batch by batch:

    * ``loss``: ``(n, runs, steps + 1)`` float32, ``nan`` where not computed;
    * ``grad``: ``(n, runs, steps)`` float32, the L∞ norm of the input gradient, ``nan`` where
      not computed;
    * ``first_fooled``: ``(n, runs)`` int32, the first iterate that fooled the model, ``-1``.
    """

    def __init__(self, n: int, runs: int, steps: int) -> None:
        self.n, self.runs, self.steps = int(n), max(1, int(runs)), int(steps)
        self.loss = torch.full((self.n, self.runs, self.steps + 1), math.nan)
        self.grad = torch.full((self.n, self.runs, self.steps), math.nan)
        self.first_fooled = torch.full((self.n, self.runs), -1, dtype=torch.int32)
        self._positions: Tensor | None = None
        self._rows: Tensor | None = None  # batch rows of the current call (None: all)
        self._slot = 0  # run index of the current call's first restart
        self._buf: tuple[Tensor, Tensor, Tensor] | None = None

    # -- the evaluation's side -------------------------------------------------------------
    def begin_batch(self, positions: Tensor, device: torch.device | str) -> None:
        """Start recording a batch whose rows are the points ``positions`` (host indices)."""
        b = len(positions)
        self._positions = positions.cpu().long()
        self._rows, self._slot = None, 0
        self._buf = (
            torch.full((b, self.runs, self.steps + 1), math.nan, device=device),
            torch.full((b, self.runs, self.steps), math.nan, device=device),
            torch.full((b, self.runs), -1, dtype=torch.int32, device=device),
        )

    def end_batch(self) -> None:
        """Copy the batch's buffers into the host tensors (one device-to-host copy)."""
        if self._buf is None or self._positions is None:
            return
        loss, grad, first = (t.cpu() for t in self._buf)
        self.loss[self._positions] = loss
        self.grad[self._positions] = grad
        self.first_fooled[self._positions] = first
        self._buf, self._positions = None, None

    # -- the attack's side -----------------------------------------------------------------
    def select(self, rows: Tensor | None, slot: int) -> None:
        """The next attack call runs on batch rows ``rows`` (None: all) as run ``slot``
        (multi-targeted attacks call this once per target class)."""
        self._rows, self._slot = rows, int(slot)

    def _index(self, rows: Tensor | None) -> Tensor | slice:
        if self._rows is None:
            return slice(None) if rows is None else rows
        return self._rows if rows is None else self._rows[rows]

    def record(
        self,
        restart: int,
        step: int,
        rows: Tensor | None,
        loss: Tensor,
        grad: Tensor | None,
        fooled: Tensor | None,
    ) -> None:
        """Iterate ``step`` of run ``restart``: per-row ``loss`` (of the rows ``rows`` of the
        call's input, None: all), the input ``grad`` (None at the last iterate) and which rows
        the iterate fooled."""
        if self._buf is None:
            return
        slot = self._slot + restart
        if slot >= self.runs or step > self.steps:
            return
        loss_buf, grad_buf, first_buf = self._buf
        idx = self._index(rows)
        loss_buf[idx, slot, step] = loss.detach().float()
        if grad is not None and step < self.steps:
            size = grad.detach().flatten(1).abs().amax(1).float()
            grad_buf[idx, slot, step] = size
        if fooled is not None:
            first = first_buf[idx, slot]
            first_buf[idx, slot] = torch.where(
                (first < 0) & fooled, torch.full_like(first, step), first
            )

    # -- reading -------------------------------------------------------------------------
    def best_run(self) -> Tensor:
        """Per point, the run that reached the highest loss at its last recorded iterate
        (the attack's most promising run; 0 for points with no record)."""
        last = last_finite(self.loss.flatten(0, 1)).view(self.n, self.runs)
        return torch.where(torch.isnan(last), -math.inf, last).argmax(1)

    def best_curves(self) -> Tensor:
        """``(n, steps + 1)``: the loss curve of each point's :meth:`best_run`."""
        run = self.best_run()
        return self.loss[torch.arange(self.n), run]

    def summary(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per point: the first, last and highest loss of its best run (nan: no record) and
        the first step, over all runs, at which an iterate fooled the model (-1: none)."""
        curves = self.best_curves()
        top = torch.where(torch.isnan(curves), -math.inf, curves).amax(1)
        top = torch.where(torch.isinf(top), math.nan, top)
        big = torch.iinfo(torch.int32).max
        fooled = self.first_fooled.masked_fill(self.first_fooled < 0, big).amin(1)
        return curves[:, 0], last_finite(curves), top, fooled.masked_fill(fooled == big, -1)


def last_finite(rows: Tensor) -> Tensor:
    """The last non-nan value of each row of a 2-d tensor (nan when there is none)."""
    finite = ~torch.isnan(rows)
    pos = torch.arange(rows.shape[1]).expand_as(rows)
    last = torch.where(finite, pos, -1).amax(1)
    out = rows.gather(1, last.clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(last >= 0, out, torch.full_like(out, math.nan))
