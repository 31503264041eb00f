"""``dwp.devices.resolve_device``: the one check of every ``device`` argument (the VAE fit,
the deep weight prior's fit, ``dwp fit-prior --device``, ``regression3d.fit``).

The machine's accelerators are faked where a test needs them (``torch.cuda`` and MPS
availability), so the index checks run on a CPU-only machine too.
"""

from __future__ import annotations

import pytest
import torch

from dwp.devices import available_devices, resolve_device


def _fake_accelerators(monkeypatch, cuda: int = 0, mps: bool = False) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("value", ["cpu", torch.device("cpu"), "cpu:0"])
def test_the_cpu_is_always_there(value) -> None:
    device = resolve_device(value)
    assert isinstance(device, torch.device) and device.type == "cpu"


def test_devices_the_machine_has_are_returned_unchanged(monkeypatch) -> None:
    _fake_accelerators(monkeypatch, cuda=2, mps=True)
    assert available_devices() == ["cpu", "cuda:0", "cuda:1", "mps"]
    assert resolve_device("cuda") == torch.device("cuda")  # the current device, no index
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert resolve_device("mps") == torch.device("mps")


@pytest.mark.parametrize(
    ("value", "cuda", "mps", "message"),
    [
        ("cuda", 0, False, r"^device 'cuda' is not available on this machine \(available: cpu\)$"),
        ("cuda:2", 2, False, r"^device 'cuda:2' is not available .*\(available: cpu, cuda:0, cuda:1\)"),
        (torch.device("cuda", 5), 1, False, r"'cuda:5' is not available"),
        ("mps", 1, False, r"^device 'mps' is not available .*\(available: cpu, cuda:0\)"),
        ("mps:1", 0, True, r"'mps:1' is not available .*\(available: cpu, mps\)"),
    ],
)  # fmt: skip
def test_a_device_the_machine_lacks_is_a_value_error_listing_those_it_has(
    monkeypatch, value, cuda, mps, message
) -> None:
    _fake_accelerators(monkeypatch, cuda=cuda, mps=mps)
    with pytest.raises(ValueError, match=message):
        resolve_device(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("gpu", r"^device 'gpu' is not a torch device \(e\.g\. 'cpu', 'cuda', 'cuda:1', 'mps'\)$"),
        ("", r"^device '' is not a torch device"),
        ("cuda:x", r"'cuda:x' is not a torch device"),
        ("meta", r"^device 'meta' is not supported: the library runs on cpu, cuda, mps devices$"),
    ],
)  # fmt: skip
def test_a_bad_name_is_a_value_error_naming_the_argument(value, message) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_device(value)


def test_messages_use_the_given_name_and_other_types_are_type_errors() -> None:
    with pytest.raises(ValueError, match=r"^--device 'gpu' is not a torch device"):
        resolve_device("gpu", name="--device")
    with pytest.raises(TypeError, match=r"^device must be a str or torch.device, got int$"):
        resolve_device(0)  # type: ignore[arg-type]
