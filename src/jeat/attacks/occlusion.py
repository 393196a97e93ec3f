"""Rectangular occlusion attack (ROA) of Wu, Tong & Vorobeychik, "Defending against physically
realizable attacks on image classification", ICLR 2020.

Threat model
    The attacker pastes one axis-aligned ``height x width`` rectangle (the same rectangle in
    every channel) anywhere in the image, and the pixels inside it may take *any* value in
    [0, 1]; every pixel outside it is left as it was. It is an abstraction of physically
    realisable attacks (stickers on a stop sign, adversarial eyeglass frames, patches): the
    change is large in value but small in area. :class:`Occlusion` is this threat model bound to
    one rectangle per example, in the form :class:`jeat.attacks.PGD` needs, so that PGD runs
    inside the rectangles unchanged.

Algorithm (:class:`ROA`)
    1. *Where*: choose the rectangle's top-left corner on the grid ``0, s, 2s, ...`` (stride
       ``s``) of positions where it fits in the image.

       - ``search="exhaustive"``: paint the rectangle a constant grey (``fill = 0.5``) at every
         grid position and keep the position whose occluded image has the largest attack loss
         for the true class (one forward pass per position, batched over images and positions).
       - ``search="gradient"``: take the input gradient of the loss at the clean image, score
         every position by the squared gradient mass inside the rectangle (summed over
         channels), keep the ``candidates`` best-scoring positions, and evaluate just those with
         the grey fill as above (one backward pass plus ``candidates`` forward passes).

    2. *What*: PGD inside the chosen rectangle, starting from the grey-filled image (or from
       uniform noise in the rectangle with ``random_start=True``): signed-gradient ascent steps
       on the pixels of the rectangle only, clamped to [0, 1], no other constraint.

Differences from the authors' code (github.com/tongwu2020/phattacks): the grid includes the
last position that fits (their ``(size - width) // stride`` positions per axis drop it); ties
in the search loss (a saturated cross-entropy, say) are broken by the CW margin
``max_{k != y} f_k - f_y`` instead of by a random position; any loss of
:data:`jeat.attacks.pgd.LOSSES` can drive the search and the PGD, not only the cross-entropy.

The attack leaves the model as it found it: train/eval modes are restored and parameter
``.grad`` fields are untouched (input gradients only, by ``torch.autograd.grad``). Randomness
(only ``random_start``) comes from ``generator``; the global RNG is never drawn from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jeat.attacks.base import check_images, logits_of, model_mode, model_width
from jeat.attacks.pgd import PGD, attack_loss
from jeat.attacks.threats import ThreatModel
from jeat.energy import check_labels, margin_from_logits
from jeat.errors import JeatError

__all__ = ["Occlusion", "ROA", "SEARCHES", "rectangle_mask", "default_side", "auto_search"]

SEARCHES = ("gradient", "exhaustive")

LossFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def _check_int(value: object, what: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise JeatError(f"{what} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise JeatError(f"{what} must be an integer >= {low}, got {value}")
    return int(value)


def default_side(image_size: Sequence[int]) -> int:
    """The default square rectangle for images whose shape ends in ``(H, W)``: about a sixth
    of the shorter side, at least 2 (2x2 on 8x8 digits, 5x5 on 28x28 MNIST and on 32x32
    CIFAR-10, the paper's CIFAR-10 size)."""
    return max(2, round(min(int(image_size[-2]), int(image_size[-1])) / 6))


def auto_search(image_size: Sequence[int], height: int, width: int, stride: int = 1) -> str:
    """``"exhaustive"`` when the grid has at most 256 positions (every position costs one
    forward pass per image), else ``"gradient"``."""
    big_h, big_w = int(image_size[-2]), int(image_size[-1])
    positions = ((big_h - height) // stride + 1) * ((big_w - width) // stride + 1)
    return "exhaustive" if positions <= 256 else "gradient"


def rectangle_mask(
    rows: Tensor,
    cols: Tensor,
    height: int,
    width: int,
    image_size: tuple[int, int],
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``N x 1 x H x W`` mask, 1 inside the ``height x width`` rectangle whose top-left corner
    is ``(rows[i], cols[i])`` in example ``i``, 0 elsewhere (on the device of ``rows``)."""
    big_h, big_w = image_size
    ar_h = torch.arange(big_h, device=rows.device)
    ar_w = torch.arange(big_w, device=rows.device)
    in_rows = (ar_h >= rows[:, None]) & (ar_h < rows[:, None] + height)  # N x H
    in_cols = (ar_w >= cols[:, None]) & (ar_w < cols[:, None] + width)  # N x W
    mask = in_rows[:, :, None] & in_cols[:, None, :]
    return mask.unsqueeze(1).to(dtype or torch.get_default_dtype())


class Occlusion(ThreatModel):
    """One ``height x width`` rectangle per image whose pixels may take any value in [0, 1].

    ``Occlusion(h, w)`` describes the threat; ``Occlusion(h, w).placed(rows, cols, x.shape)``
    binds it to one rectangle per example (top-left corners ``rows``, ``cols``), which is what
    the PGD moves need: ``PGD(Occlusion(h, w).placed(...), steps=20)(model, x, y)`` perturbs
    only the pixels inside the rectangles. Its ``mask`` is ``N x 1 x H x W``, 1 inside.

    ``eps`` is 1.0: inside the rectangle the L-inf change is bounded only by the [0, 1] pixel
    range, so ``distance`` (the L-inf change, ``inf`` for a change outside the rectangle) is
    ``<= eps`` exactly for members of the threat set. The attack's real budget is the area
    ``height x width``; ``describe()`` gives ``"patch HxW"``.

    ``default_step_size`` is 0.05 on [0, 1] pixels, the PGD learning rate of the authors'
    CIFAR-10 runs (their code also feeds [0, 1] pixels and normalises inside the model; their
    LISA runs used 0.01 with 30 steps, their face runs 4/255 with 50 steps). With 20 steps
    it lets a pixel cross the whole range once (20 x 0.05 = 1) from anywhere in it, e.g. grey
    0.5 to 0 and back, while staying fine enough to settle on intermediate values.
    """

    norm = "patch"
    rowwise = False  # the placed mask holds one rectangle per example

    def __init__(self, height: int, width: int, mask: Tensor | None = None) -> None:
        self.height = _check_int(height, "occlusion rectangle height")
        self.width = _check_int(width, "occlusion rectangle width")
        self.eps = 1.0
        if mask is not None and (mask.dim() != 4 or mask.shape[1] != 1):
            raise JeatError(
                f"an occlusion mask must be N x 1 x H x W, got shape {tuple(mask.shape)}"
            )
        self.mask = mask

    # -- placing ---------------------------------------------------------------------------

    def placed(
        self,
        rows: Tensor | Sequence[int],
        cols: Tensor | Sequence[int],
        shape: Sequence[int],
        dtype: torch.dtype | None = None,
    ) -> Occlusion:
        """This threat bound to one rectangle per example with top-left corners ``(rows[i],
        cols[i])`` in images of ``shape`` (``N x C x H x W``, or anything ending in ``H, W``).
        The mask lives on the device of ``rows`` (when a tensor) and has ``dtype``."""
        rows_t = torch.as_tensor(rows)
        cols_t = torch.as_tensor(cols, device=rows_t.device)
        if len(shape) < 2:
            raise JeatError(f"image shape must end in (height, width), got {tuple(shape)}")
        big_h, big_w = int(shape[-2]), int(shape[-1])
        self._check_fits(big_h, big_w)
        for name, t in (("rows", rows_t), ("cols", cols_t)):
            if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise JeatError(
                    f"rectangle {name} must be a 1-D integer tensor of top-left corners, "
                    f"got dtype {t.dtype} and shape {tuple(t.shape)}"
                )
        if rows_t.shape != cols_t.shape:
            raise JeatError(
                f"rectangle rows and cols must have one entry per image, got {rows_t.numel()} "
                f"rows and {cols_t.numel()} cols"
            )
        if len(shape) == 4 and rows_t.numel() != int(shape[0]):
            raise JeatError(
                f"need one rectangle per image: {rows_t.numel()} corners for {shape[0]} images"
            )
        if rows_t.numel():
            r_lo, r_hi = int(rows_t.min()), int(rows_t.max())
            c_lo, c_hi = int(cols_t.min()), int(cols_t.max())
            if r_lo < 0 or r_hi > big_h - self.height or c_lo < 0 or c_hi > big_w - self.width:
                raise JeatError(
                    f"a {self.height}x{self.width} rectangle in {big_h}x{big_w} images needs its "
                    f"top-left corner in rows [0, {big_h - self.height}] and cols "
                    f"[0, {big_w - self.width}], got rows [{r_lo}, {r_hi}], cols [{c_lo}, {c_hi}]"
                )
        mask = rectangle_mask(
            rows_t.long(), cols_t.long(), self.height, self.width, (big_h, big_w), dtype
        )
        return Occlusion(self.height, self.width, mask)

    def _check_fits(self, big_h: int, big_w: int) -> None:
        if self.height > big_h or self.width > big_w:
            raise JeatError(
                f"the {self.height}x{self.width} occlusion rectangle does not fit in "
                f"{big_h}x{big_w} images; use a rectangle at most {big_h}x{big_w}"
            )

    def _bound_mask(self, like: Tensor) -> Tensor:
        if self.mask is None:
            raise JeatError(
                "this Occlusion threat has no rectangles yet; place them with "
                "Occlusion(h, w).placed(rows, cols, x.shape) (ROA does this for you)"
            )
        m = self.mask
        if m.shape[0] != like.shape[0] or m.shape[-2:] != like.shape[-2:]:
            raise JeatError(
                f"the occlusion mask was placed for {m.shape[0]} images of size "
                f"{tuple(m.shape[-2:])}, got a batch of shape {tuple(like.shape)}"
            )
        return m.to(device=like.device, dtype=like.dtype)

    # -- the moves PGD needs -------------------------------------------------------------

    @property
    def default_step_size(self) -> float:
        """0.05 on [0, 1] pixels (see the class docstring)."""
        return 0.05

    def random_init(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """``x`` with its rectangles filled with uniform noise in [0, 1]."""
        m = self._bound_mask(x)
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x * (1 - m) + u * m

    def step(self, x_adv: Tensor, grad: Tensor, step_size: float) -> Tensor:
        return x_adv + step_size * grad.sign() * self._bound_mask(x_adv)

    def project_delta(self, delta: Tensor) -> Tensor:
        return delta * self._bound_mask(delta)

    def distance(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Per-example L-inf change inside the rectangle; ``inf`` where anything outside it
        changed (so ``distance <= eps`` exactly for members of the threat set)."""
        m = self._bound_mask(x)
        diff = (x_adv - x).abs()
        inside = (diff * m).flatten(1).amax(dim=1)
        outside = (diff * (1 - m)).flatten(1).amax(dim=1) > 0
        return inside.masked_fill(outside, float("inf"))

    def with_eps(self, eps: float) -> ThreatModel:
        raise JeatError(
            "the occlusion threat's budget is its rectangle size, not eps; "
            "build Occlusion(height, width) with another size instead"
        )

    def describe(self) -> str:
        return f"{self.norm} {self.height}x{self.width}"

    def __repr__(self) -> str:
        placed = "" if self.mask is None else f", placed for {self.mask.shape[0]} images"
        return f"Occlusion(height={self.height}, width={self.width}{placed})"


@dataclass
class ROA:
    """Rectangular occlusion attack: place a ``height x width`` rectangle where it hurts most,
    then run PGD on its pixels (Wu, Tong & Vorobeychik, ICLR 2020; see the module docstring).

    ``search`` is ``"gradient"`` (score positions by the squared input gradient inside the
    rectangle, evaluate the best ``candidates`` of them with the grey ``fill``) or
    ``"exhaustive"`` (evaluate every position with the fill). Positions lie on a grid of
    ``stride``. ``steps``, ``step_size`` (default: :attr:`Occlusion.default_step_size`, 0.05),
    ``random_start`` and ``loss`` configure the PGD inside the rectangle; it starts from the
    grey-filled rectangle unless ``random_start``. ``max_batch`` bounds the number of occluded
    images per forward pass during the search (memory). Defaults follow the authors' code:
    stride 1, grey 0.5, no random start; ``candidates=10`` lies between their 5 (LISA) and
    20-50 (CIFAR-10), plenty for images of 8x8 to 32x32.
    """

    height: int
    width: int
    search: str = "gradient"
    stride: int = 1
    candidates: int = 10
    steps: int = 20
    step_size: float | None = None
    fill: float = 0.5
    random_start: bool = False
    loss: str = "ce"
    eval_mode: bool = True
    max_batch: int = 1024

    def __post_init__(self) -> None:
        self.height = _check_int(self.height, "occlusion rectangle height")
        self.width = _check_int(self.width, "occlusion rectangle width")
        self.stride = _check_int(self.stride, "occlusion search stride")
        self.candidates = _check_int(self.candidates, "number of candidate positions")
        self.steps = _check_int(self.steps, "attack steps")
        self.max_batch = _check_int(self.max_batch, "occlusion search max_batch")
        if not isinstance(self.search, str) or self.search.lower() not in SEARCHES:
            raise JeatError(
                f"unknown occlusion search '{self.search}'; choose one of {', '.join(SEARCHES)}"
            )
        self.search = self.search.lower()
        attack_loss(self.loss)
        if not (isinstance(self.fill, (int, float)) and 0.0 <= self.fill <= 1.0):
            raise JeatError(f"occlusion fill must be a pixel value in [0, 1], got {self.fill!r}")
        if self.step_size is None:
            self.step_size = self.threat.default_step_size
        if not math.isfinite(self.step_size) or self.step_size < 0:
            raise JeatError(f"attack step size must be >= 0, got {self.step_size}")

    @property
    def threat(self) -> Occlusion:
        """The (unplaced) threat model."""
        return Occlusion(self.height, self.width)

    # -- public API ------------------------------------------------------------------------

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator | None = None,
        check: bool = True,
    ) -> Tensor:
        """Return ``x`` with one adversarial ``height x width`` rectangle per image (detached,
        same shape, values in [0, 1], equal to ``x`` outside the rectangles)."""
        x, y = self._validate(model, x, y, check)
        if x.shape[0] == 0:
            return x.clone()
        rows, cols = self._locate(model, x, y)
        threat = self.threat.placed(rows, cols, x.shape, dtype=x.dtype)
        mask = threat._bound_mask(x)
        start = x * (1 - mask) + self.fill * mask
        pgd = PGD(
            threat,
            steps=self.steps,
            step_size=self.step_size,
            loss=self.loss,
            random_start=self.random_start,
            eval_mode=self.eval_mode,
        )
        # PGD projects onto {start outside the rectangle, anything in [0, 1] inside}: the
        # outside of ``start`` is ``x``, so this is exactly the occlusion set around ``x``.
        return pgd(model, start, y, generator=generator, check=False)

    def locate(
        self, model: nn.Module, x: Tensor, y: Tensor, check: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Top-left corners ``(rows, cols)`` (int64, on x's device) of the rectangle the search
        picks for each image."""
        x, y = self._validate(model, x, y, check)
        if x.shape[0] == 0:
            empty = torch.zeros(0, dtype=torch.long, device=x.device)
            return empty, empty.clone()
        return self._locate(model, x, y)

    def positions(self, image_size: tuple[int, int], device: torch.device | None = None):
        """Row and column offsets of the search grid (int64), for images of ``image_size``."""
        big_h, big_w = image_size
        self.threat._check_fits(big_h, big_w)
        r = torch.arange(0, big_h - self.height + 1, self.stride, device=device)
        c = torch.arange(0, big_w - self.width + 1, self.stride, device=device)
        return r, c

    # -- internals -------------------------------------------------------------------------

    def _validate(
        self, model: nn.Module, x: Tensor, y: Tensor, check: bool
    ) -> tuple[Tensor, Tensor]:
        if check:
            check_images(x)
        self.threat._check_fits(int(x.shape[-2]), int(x.shape[-1]))
        x = x.detach()
        if check and x.shape[0] == 0:
            y = check_labels(y, 1, 0)  # shape and dtype only: no model call on an empty batch
        elif check:
            with model_mode(model, self.eval_mode):
                y = check_labels(y, model_width(model, x), x.shape[0])
        return x, y.long()

    def _locate(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss_fn = attack_loss(self.loss)
        n = x.shape[0]
        r, c = self.positions((int(x.shape[-2]), int(x.shape[-1])), x.device)
        with model_mode(model, self.eval_mode):
            if self.search == "exhaustive":
                cand_r = r.repeat_interleave(c.numel()).expand(n, -1)
                cand_c = c.repeat(r.numel()).expand(n, -1)
            else:
                cand_r, cand_c = self._gradient_candidates(model, x, y, loss_fn, r, c)
            with torch.no_grad():
                loss, margin = self._occluded_losses(model, x, y, loss_fn, cand_r, cand_c)
                # best loss; among exact ties (a saturated loss), the largest CW margin
                best = loss.max(dim=1, keepdim=True).values
                key = margin.masked_fill(loss < best, float("-inf"))
                pick = key.argmax(dim=1, keepdim=True)
        return cand_r.gather(1, pick).squeeze(1), cand_c.gather(1, pick).squeeze(1)

    def _gradient_candidates(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        loss_fn: LossFn,
        r: Tensor,
        c: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """The ``candidates`` grid positions with the most squared input-gradient mass."""
        grads = []
        with torch.enable_grad():
            for xb, yb in zip(x.split(self.max_batch), y.split(self.max_batch), strict=True):
                xb = xb.clone().requires_grad_(True)
                loss = loss_fn(logits_of(model, xb), yb, None).sum()
                (g,) = torch.autograd.grad(loss, xb)
                grads.append(g)
        g2 = torch.cat(grads).float().pow(2).sum(dim=1, keepdim=True)  # N x 1 x H x W
        # box sums of the squared gradient at every grid position: N x R x C
        mass = F.avg_pool2d(g2, (self.height, self.width), stride=self.stride).squeeze(1)
        mass = mass[:, : r.numel(), : c.numel()].flatten(1)
        k = min(self.candidates, mass.shape[1])
        top = mass.topk(k, dim=1).indices
        return r[top // c.numel()], c[top % c.numel()]

    def _occluded_losses(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        loss_fn: LossFn,
        cand_r: Tensor,
        cand_c: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Loss and CW margin of each image with a ``fill`` rectangle at each of its candidate
        positions (``N x K`` each), ``max_batch`` occluded images per forward pass."""
        n, k = cand_r.shape
        flat_r, flat_c = cand_r.reshape(-1), cand_c.reshape(-1)
        losses = torch.empty(n * k, device=x.device, dtype=torch.float32)
        margins = torch.empty_like(losses)
        image_size = (int(x.shape[-2]), int(x.shape[-1]))
        for lo in range(0, n * k, self.max_batch):
            idx = torch.arange(lo, min(lo + self.max_batch, n * k), device=x.device)
            img = idx // k
            m = rectangle_mask(
                flat_r[idx], flat_c[idx], self.height, self.width, image_size, x.dtype
            )
            occluded = x[img] * (1 - m) + self.fill * m
            logits = logits_of(model, occluded)
            losses[idx] = loss_fn(logits, y[img], None).float()
            margins[idx] = margin_from_logits(logits, y[img], check=False).float()
        return losses.view(n, k), margins.view(n, k)
