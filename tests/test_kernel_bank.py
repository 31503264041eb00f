"""dwp.kernel_bank: the bank's pruning, selection and summary, the checks on construction,
and its file (round trip, atomic write, damaged and foreign files).
"""

import os

import pytest
import torch
from kernel_nets import assert_same_bank as _assert_same_bank
from kernel_nets import net2d as _net2d
from kernel_nets import unet as _unet

import dwp
from dwp.kernel_bank import KernelBank, KernelBankError
from dwp.kernels import collect_kernels


# -- the bank -----------------------------------------------------------------------------
def test_prune_keeps_the_kernels_of_large_norm():
    bank = collect_kernels(
        [_unet(0), _unet(1)], "resolution", example_input=torch.randn(1, 1, 16, 16, 16)
    )
    norms = bank.kernels.flatten(1).norm(dim=1)
    threshold = norms.median().item()
    pruned = bank.prune(threshold)
    keep = norms >= threshold
    assert torch.equal(pruned.kernels, bank.kernels[keep])
    for name in ("group", "source", "layer"):
        assert torch.equal(getattr(pruned, name), getattr(bank, name)[keep])
    assert pruned.metadata["min_norm"] == threshold
    assert pruned.metadata["total"] == bank.metadata["total"]
    assert pruned.metadata["kept"] == {g: len(k) for g, k in pruned.groups().items()}
    assert sum(pruned.metadata["kept"].values()) == int(keep.sum())
    assert bank.metadata["kept"] == bank.metadata["total"]  # the original is untouched
    _assert_same_bank(
        pruned,
        collect_kernels(
            [_unet(0), _unet(1)],
            "resolution",
            example_input=torch.randn(1, 1, 16, 16, 16),
            min_norm=threshold,
        ),
    )
    # pruning again: the higher threshold, the first total; an emptied group stays known
    empty = pruned.prune(1e9)
    assert len(empty) == 0 and empty.metadata["min_norm"] == 1e9
    assert empty.metadata["total"] == bank.metadata["total"]
    assert empty.select("g2_4x4x4").shape == (0, 3, 3, 3)
    assert "| g2_4x4x4 | 1 | 0 of 8 | - |" in empty.summary()
    with pytest.raises(ValueError, match="min_norm"):
        bank.prune(-1.0)


def test_select_groups_and_summary():
    bank = collect_kernels(_net2d(), "all")
    assert list(bank.groups()) == ["all"]
    with pytest.raises(KeyError, match=r"'decoder'.*known groups: \['all'\]"):
        bank.select("decoder")
    summary = bank.summary().splitlines()
    assert summary[0] == "| group | layers | kernels | mean norm |"
    mean = bank.kernels.flatten(1).norm(dim=1).mean().item()
    assert summary[2] == f"| all | 2 | 24 | {mean:.4g} |"
    assert "24 kernels of 5x5" in repr(bank)


def test_construction_checks_consistency():
    bank = collect_kernels(_net2d())
    fields = dict(
        kernels=bank.kernels,
        group=bank.group,
        source=bank.source,
        layer=bank.layer,
        group_names=bank.group_names,
        source_names=bank.source_names,
        layer_names=bank.layer_names,
        layer_groups=bank.layer_groups,
    )
    KernelBank(**fields)
    bad = [
        ({"kernels": bank.kernels.double()}, "float32"),
        ({"group": bank.group[1:]}, "group has 23 entries for 24 kernels"),
        ({"source": bank.source + 1}, r"source indices must lie in \[0, 1\)"),
        ({"layer": bank.layer.int()}, "int64"),
        ({"layer_groups": {"conv1": "conv1"}}, r"missing \['conv2'\]"),
        ({"layer_groups": {"conv1": "conv1", "conv2": "x"}}, "unknown groups"),
        ({"layer_groups": {"conv1": "conv2", "conv2": "conv1"}}, "is in group"),
        ({"layer_names": ["conv1", "conv1"]}, "unique"),
        ({"kernels": bank.kernels * float("nan")}, "NaN"),
    ]
    for change, message in bad:
        with pytest.raises(KernelBankError, match=message):
            KernelBank(**{**fields, **change})


# -- files --------------------------------------------------------------------------------
def test_save_load_round_trip_is_atomic(tmp_path):
    bank = collect_kernels(
        [_unet(0), _unet(1)], "resolution", example_input=torch.randn(1, 1, 16, 16, 16)
    ).prune(0.1)
    path = tmp_path / "bank.pt"
    path.write_bytes(b"an older file")
    bank.save(path)
    assert os.listdir(tmp_path) == ["bank.pt"]  # replaced, no temporary file left
    loaded = KernelBank.load(str(path))
    _assert_same_bank(bank, loaded)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "dwp.KernelBank" and raw["format_version"] == 1
    assert raw["dwp_version"] == dwp.__version__


def test_save_keeps_the_old_file_when_writing_fails(tmp_path):
    bank = collect_kernels(_net2d())
    bank.save(tmp_path / "bank.pt")
    broken = KernelBank(**{**_fields(bank), "metadata": {"when": object()}})
    with pytest.raises(TypeError, match="plain Python values"):
        broken.save(tmp_path / "bank.pt")
    assert os.listdir(tmp_path) == ["bank.pt"]
    _assert_same_bank(bank, KernelBank.load(tmp_path / "bank.pt"))


def _fields(bank):
    return {
        name: getattr(bank, name)
        for name in (
            "kernels",
            "group",
            "source",
            "layer",
            "group_names",
            "source_names",
            "layer_names",
            "layer_groups",
            "metadata",
        )
    }


def test_load_rejects_damaged_and_foreign_files(tmp_path):
    bank = collect_kernels(_net2d())
    good = tmp_path / "good.pt"
    bank.save(good)
    payload = torch.load(good, weights_only=True)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(KernelBankError, match=r"truncated\.pt: cannot read"):
        KernelBank.load(truncated)

    torch.save({"weights": torch.randn(3), "step": 7}, tmp_path / "other.pt")
    with pytest.raises(KernelBankError, match=r"other\.pt: not a dwp kernel bank"):
        KernelBank.load(tmp_path / "other.pt")

    cases = {
        "index.pt": ({"layer": payload["layer"] * 5}, r"layer indices must lie in \[0, 2\)"),
        "missing.pt": ({"layer_groups": None}, r"misses keys \['layer_groups'\]"),
        "newer.pt": ({"format_version": 2}, "format version 2 is not readable"),
        "dtype.pt": ({"kernels": payload["kernels"].half()}, "float32"),
    }
    for name, (change, message) in cases.items():
        damaged = {**payload, **change}
        damaged = {k: v for k, v in damaged.items() if v is not None}
        torch.save(damaged, tmp_path / name)
        with pytest.raises(KernelBankError, match=f"{name.replace('.', '[.]')}: .*{message}"):
            KernelBank.load(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        KernelBank.load(tmp_path / "absent.pt")
