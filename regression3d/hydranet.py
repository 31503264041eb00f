"""Hydranet set-sum augmentation for any regressor (Dubost et al. 2019).

Training sees *sets* of up to ``n`` images (default 4) drawn without replacement; each
member is replaced by a zero image with probability ``p``; the loss compares the **sum** of
the regressor's predictions with the sum of the labels (counts and volumes add up).  At test
time the regressor is used alone.

The paper replicates the network ``n`` times in one graph, which holds ``n`` volumes'
activations at once.  :func:`set_loss_backward` does the same by default (all members of
all sets in one batch: one forward and one backward pass, the cost per image of an
ordinary minibatch).  For volumes too large for that it streams the members a few at a
time (``members_per_pass``): a first pass without autograd gives the scalar predictions and
the loss's gradient ``g`` with respect to their sum; a second pass per batch of members
back-propagates ``g`` through them alone.  The gradient is exactly that of the one-graph
loss (the chain rule through a sum), at the memory of one batch of members and the cost of
one extra forward pass.  Random draws inside the network are replayed identically in every
streamed pass, so with a Bayesian network's default (one weight sample per forward pass,
``reparam``) all members of a step see one and the same network sample either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dwp.amp import autocast

__all__ = [
    "SetBatch",
    "draw_sets",
    "set_loss_backward",
    "set_members",
    "set_sum",
    "set_targets",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class SetBatch:
    """Sets of training items.

    Attributes
    ----------
    index
        ``(S, n)`` int64 item indices.
    keep
        ``(S, n)`` bool; ``False`` where the member is a zero image (label 0).
    """

    index: Tensor
    keep: Tensor

    def __post_init__(self) -> None:
        if self.index.dim() != 2 or self.index.shape != self.keep.shape:
            raise ValueError(
                f"index and keep must both be (S, n), got {tuple(self.index.shape)} and "
                f"{tuple(self.keep.shape)}"
            )

    def __len__(self) -> int:
        return self.index.shape[0]

    @property
    def set_size(self) -> int:
        return self.index.shape[1]

    def __getitem__(self, i: slice | Tensor) -> SetBatch:
        return SetBatch(self.index[i], self.keep[i])


def draw_sets(
    n_items: int,
    set_size: int = 4,
    p_zero: float = 0.1,
    *,
    generator: torch.Generator | None = None,
) -> SetBatch:
    """One epoch of sets: a random permutation of the items cut into sets of ``set_size``.

    Every item is used once; the last set is completed with zero images.  Each member is
    then replaced by a zero image with probability ``p_zero``.

    Returns
    -------
    SetBatch
        ``ceil(n_items / set_size)`` sets.
    """
    if n_items < 1 or set_size < 1:
        raise ValueError(f"n_items and set_size must be >= 1, got {n_items}, {set_size}")
    if not 0.0 <= p_zero < 1.0:
        raise ValueError(f"p_zero must be in [0, 1), got {p_zero}")
    n_sets = -(-n_items // set_size)
    order = torch.randperm(n_items, generator=generator)
    index = torch.zeros(n_sets * set_size, dtype=torch.long)
    index[:n_items] = order
    keep = torch.zeros(n_sets * set_size, dtype=torch.bool)
    keep[:n_items] = True
    keep &= torch.rand(n_sets * set_size, generator=generator) >= p_zero
    return SetBatch(index.view(n_sets, set_size), keep.view(n_sets, set_size))


def set_targets(y: Tensor, sets: SetBatch) -> Tensor:
    """Sum of the kept members' labels: ``y`` ``(N, *T)`` -> ``(S, *T)``."""
    picked = y[sets.index]  # (S, n, *T)
    mask = sets.keep.view(*sets.keep.shape, *([1] * (y.dim() - 1))).to(y.dtype)
    return (picked * mask).sum(dim=1)


def set_members(x: Tensor, sets: SetBatch) -> list[Tensor]:
    """Member ``j`` of every set: ``n`` tensors ``(S, C, *spatial)``, zero images where dropped."""
    out = []
    for j in range(sets.set_size):
        member = x[sets.index[:, j]]
        mask = sets.keep[:, j].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        out.append(member * mask)
    return out


@contextlib.contextmanager
def _replayed_randomness(device: torch.device) -> Iterator[Callable[[], None]]:
    """Yield ``rewind()``, which resets the global RNG (CPU and ``device``) to its state on
    entry, so every forward pass after a rewind draws the same random numbers."""
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def rewind() -> None:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)

    yield rewind


def _check_members(members: Sequence[Tensor]) -> None:
    if not members:
        raise ValueError("members is empty: a set needs at least one member")
    shapes = {tuple(m.shape) for m in members}
    if len(shapes) != 1:
        raise ValueError(f"set members must share one shape, got {sorted(shapes)}")


def set_sum(model: nn.Module, members: Sequence[Tensor], *, same_sample: bool = True) -> Tensor:
    """``sum_j model(members[j])`` in one autograd graph: ``(S, *out)``.

    The paper's formulation (all members' activations held at once); use it for small inputs
    or as the reference for :func:`set_loss_backward`.  ``same_sample`` replays the random
    draws, so a Bayesian model uses one weight sample for all members.
    """
    _check_members(members)
    with _replayed_randomness(members[0].device) as rewind:
        total = None
        for member in members:
            if same_sample:
                rewind()
            out = model(member)
            total = out if total is None else total + out
    return total


def set_loss_backward(
    model: nn.Module,
    members: Sequence[Tensor],
    target: Tensor,
    loss_fn: LossFn = lambda s, t: F.mse_loss(s, t, reduction="sum"),
    *,
    members_per_pass: int | None = None,
    precision: str = "off",
) -> tuple[Tensor, Tensor]:
    """Set-sum loss and its gradient, all members in one pass or a few at a time.

    Computes ``loss = loss_fn(sum_j model(members[j]), target)`` and accumulates its
    gradient into the parameters' ``.grad`` (as ``loss.backward()`` would).

    Parameters
    ----------
    model
        Any regressor ``(S, C, *spatial) -> (S, *out)``.
    members
        ``n`` tensors ``(S, C, *spatial)`` (see :func:`set_members`).
    target
        ``(S, *out)`` label sums (see :func:`set_targets`).
    loss_fn
        ``(sum of predictions, target) -> scalar``; default the summed squared error.  For an
        ELBO pass e.g. ``dwp.likelihoods.gaussian_nll`` scaled by ``N / B``, then add the KL's
        gradient separately.
    members_per_pass
        ``None`` (default): every member of every set in one batch of ``n * S`` images, one
        forward and one backward pass (the paper's one graph, and as fast per image as
        ordinary minibatches).  ``k``: batches of ``k`` members (``k * S`` images), streamed
        as the module docstring describes, holding only their activations; ``1`` for the
        least memory.  The gradient is the same either way.
    precision
        ``"off"``, ``"bf16"`` or ``"fp16"``: the forward passes under
        :func:`dwp.amp.autocast`, the sum and ``loss_fn`` in float32.  For fp16 pass a
        ``loss_fn`` scaled by the caller's :func:`dwp.amp.grad_scaler`.

    Returns
    -------
    tuple of Tensor
        The loss (detached scalar) and the sum of predictions ``(S, *out)`` (detached).
    """
    _check_members(members)
    if members_per_pass is not None and members_per_pass < 1:
        raise ValueError(f"members_per_pass must be >= 1 or None, got {members_per_pass}")
    n, n_sets = len(members), members[0].shape[0]
    chunk = n if members_per_pass is None else min(members_per_pass, n)
    passes = [torch.cat(list(members[i : i + chunk])) for i in range(0, n, chunk)]

    def summed(batch: Tensor) -> Tensor:  # (k * S, *out) -> (S, *out): sum over members
        with autocast(precision, batch.device):
            out = model(batch)
        return out.float().view(-1, n_sets, *out.shape[1:]).sum(0)

    def checked_loss(total: Tensor) -> Tensor:
        if total.shape != target.shape:
            raise ValueError(
                f"target {tuple(target.shape)} must have the predictions' shape "
                f"{tuple(total.shape)}"
            )
        loss = loss_fn(total, target)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        return loss

    with torch.enable_grad():
        if len(passes) == 1:
            total = summed(passes[0])
            loss = checked_loss(total)
            loss.backward()
            return loss.detach(), total.detach()
        with _replayed_randomness(members[0].device) as rewind:
            with torch.no_grad():
                partial = []
                for batch in passes:
                    rewind()
                    partial.append(summed(batch))
            total = torch.stack(partial).sum(0).requires_grad_(True)
            loss = checked_loss(total)
            (grad,) = torch.autograd.grad(loss, total)
            for batch in passes:
                rewind()
                summed(batch).backward(grad)
    return loss.detach(), total.detach()
