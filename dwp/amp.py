"""Mixed precision for variational networks: the forward pass in bf16 / fp16, the
variational objective in float32.

Autocast lowers convolutions and matrix products to 16 bits, which is where a 3D network
spends its time.  What must not be lowered is the objective's small print: the posterior's
log-scales (``exp`` of a 16-bit log-scale moves the scale by ~0.4 %), the KL terms (the
deep weight prior's bound runs its kernel VAE, whose layers autocast would lower too) and
the sum of a data term over a million voxels.  So:

* the parameters stay float32 (autocast casts copies for each op, never the weights), so
  the log-scales, the sampled weights and their noise are float32;
* :func:`dwp.kl` runs with autocast off (every prior, whichever device);
* the caller computes the data term from ``logits.float()`` outside :func:`autocast`
  (``unet3d.train`` does), so the ELBO is float32.

fp16 needs a loss scale against gradient underflow (:func:`grad_scaler`); bf16 has
float32's exponent range and needs none.

A torch defect guarded here (:func:`guard_cpu_bf16_conv3d`, measured with torch 2.13 on an
AMD EPYC with avx512_bf16): under CPU bf16 autocast, the weight gradient of a 3x3x3
``Conv3d`` whose input has depth 2 is wrong by orders of magnitude (relative error up to
inf; 3e-3, bf16's rounding, at every other depth tried: 1, 3, 4, 6, 8, 16).  A U-Net with
three stride-2 levels hits it at 16-voxel volumes.  Refused with a clear error instead of
training on garbage gradients.

Precisions by device (:func:`check_precision`): ``cpu``: ``bf16``; ``cuda``: ``fp16``, and
``bf16`` where the GPU has it (Ampere and later).  CPU fp16 autocast exists in torch but
has few fast kernels, and MPS autocast is untested here: both are refused rather than
silently slow or wrong.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .nn import BayesConv3d

__all__ = [
    "PRECISIONS",
    "Precision",
    "autocast",
    "check_precision",
    "float32_only",
    "grad_scaler",
    "guard_cpu_bf16_conv3d",
]

Precision = Literal["off", "bf16", "fp16"]
#: ``"off"``: float32 throughout (the default)
PRECISIONS: tuple[str, ...] = ("off", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device | str, name: str = "amp") -> None:
    """Raise unless ``device`` runs ``precision`` (see the module).

    Parameters
    ----------
    precision
        One of :data:`PRECISIONS`.
    device
        The device the network computes on.
    name
        What the message calls the option (``"amp"``, ``"--amp"``).

    Raises
    ------
    ValueError
        An unknown precision, or one ``device`` lacks; one line naming ``name``, the device
        and what to use instead.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"{name} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "off":
        return
    device = torch.device(device)
    if device.type == "cpu" and precision == "fp16":
        raise ValueError(f"{name} fp16 needs a CUDA device (device {device}); use {name} bf16")
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{name} bf16: {device} has no bfloat16 (pre-Ampere); use {name} fp16")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} {precision} is not supported on {device}; use {name} off")


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``precision`` on ``device``'s type (a no-op for ``"off"``).

    Compute the loss from ``logits.float()`` after leaving it (see the module)."""
    if precision == "off":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])


@contextlib.contextmanager
def float32_only(device: torch.device | str) -> Iterator[None]:
    """Autocast off for ``device``'s type inside the block: what is computed there stays in
    its inputs' dtype (float32 parameters: float32) even inside :func:`autocast`."""
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda"):  # nothing autocasts there (check_precision)
        yield
        return
    with torch.autocast(device_type, enabled=False):
        yield


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler:
    """The loss scaler ``precision`` needs: enabled for ``fp16`` (gradients below fp16's
    range would flush to zero), a pass-through otherwise (``scale(loss)`` is ``loss`` and
    ``step(optimizer)`` is ``optimizer.step()``)."""
    device_type = torch.device(device).type
    return torch.amp.GradScaler(
        device_type if device_type in ("cpu", "cuda") else "cpu", enabled=precision == "fp16"
    )


def guard_cpu_bf16_conv3d(
    model: nn.Module, precision: str = "bf16", device: torch.device | str = "cpu"
) -> list[RemovableHandle]:
    """Make every 3D convolution of ``model`` refuse an input of depth 2 while CPU bf16
    autocast is on and gradients are wanted (the torch defect of the module docstring).

    Parameters
    ----------
    model
        Any network; its ``Conv3d`` modules and Bayesian 3D convolutions get a forward
        pre-hook (nothing else changes).
    precision, device
        The run's: the hooks are installed for ``"bf16"`` on the CPU only, so a training
        loop calls this whatever its settings.

    Returns
    -------
    list of RemovableHandle
        The hooks, to ``remove()`` them (none where the defect cannot occur).

    Raises
    ------
    ValueError
        From a forward pass that would hit the defect, naming the layer and the way out.
    """

    def check(name: str) -> object:
        def hook(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            if (
                x.dim() == 5
                and x.shape[2] == 2
                and x.device.type == "cpu"
                and torch.is_grad_enabled()
                and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16
            ):
                raise ValueError(
                    f"layer {name!r}: bf16 autocast on the CPU computes wrong Conv3d weight "
                    f"gradients for inputs of depth 2 (input {tuple(x.shape)}; a torch / "
                    "oneDNN defect, see dwp.amp); use volumes or patches whose feature maps "
                    "are never 2 voxels deep (for the U-Net: at least 24 voxels per axis), "
                    "or amp 'off'"
                )

        return hook

    if precision != "bf16" or torch.device(device).type != "cpu":
        return []
    return [
        module.register_forward_pre_hook(check(name))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv3d, BayesConv3d))
    ]
