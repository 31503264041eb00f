"""Checking a ``device`` argument once, before any work: one rule for the whole library.

Every fit that takes a ``device`` (``dwp.DeepWeightPrior.fit``, ``dwp.fit_kernel_vae``,
``dwp fit-prior --device``, ``regression3d.fit``) resolves it with :func:`resolve_device`.
Without the check a missing GPU surfaces only at the first ``.to(device)`` or forward
pass, as a traceback from deep inside torch, after the data are read; a typo such as
``"gpu"`` would do the same.
"""

from __future__ import annotations

import torch

__all__ = ["available_devices", "resolve_device"]

#: Device types the library runs on (``meta`` and the like hold no numbers to fit).
SUPPORTED = ("cpu", "cuda", "mps")


def available_devices() -> list[str]:
    """The devices this machine has, as ``torch.device`` strings: ``cpu`` first, then
    ``cuda:0`` ... ``cuda:<n-1>``, then ``mps`` where there is one."""
    available = ["cpu"]
    if torch.cuda.is_available():
        available += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        available.append("mps")
    return available


def resolve_device(value: str | torch.device, name: str = "device") -> torch.device:
    """``value`` as a :class:`torch.device`, checked to exist on this machine.

    Parameters
    ----------
    value
        A device name (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) or a
        :class:`torch.device`.
    name
        What the messages call the argument (``"device"``, ``"--device"``).

    Returns
    -------
    torch.device
        ``torch.device(value)`` unchanged (``"cuda"`` stays the current CUDA device).

    Raises
    ------
    TypeError
        ``value`` is neither a string nor a :class:`torch.device`.
    ValueError
        ``value`` is not a device name, a device type the library does not run on, or a
        device this machine lacks (a CUDA index >= the device count, CUDA or MPS without
        that backend); the message names ``name`` and lists the devices there are.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if not isinstance(value, (str, torch.device)):
        # torch.device(0) would mean cuda:0: an int is more likely a mistake than that
        raise TypeError(f"{name} must be a str or torch.device, got {type(value).__name__}")
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ValueError(
            f"{name} {value!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1', 'mps')"
        ) from None
    if device.type not in SUPPORTED:
        raise ValueError(
            f"{name} {str(device)!r} is not supported: the library runs on "
            f"{', '.join(SUPPORTED)} devices"
        )
    if device.type == "cpu":
        return device
    available = available_devices()
    index = 0 if device.index is None else device.index
    # "cuda" means the current CUDA device, which exists whenever cuda:0 does
    present = f"{device.type}:{index}" in available or (
        device.type == "mps" and index == 0 and "mps" in available
    )
    if not present:
        raise ValueError(
            f"{name} {str(device)!r} is not available on this machine "
            f"(available: {', '.join(available)})"
        )
    return device
