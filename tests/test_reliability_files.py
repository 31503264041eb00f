"""Damaged, truncated, non-finite and half-written files: every one is an error naming it.

torch never checks the CRC-32s of its zip records, so before dwp sealed its files with a
checksum a checkpoint or prior with flipped bytes loaded and gave wrong numbers; a full
disk said "[Errno 28]" without naming the file; and interrupted writes left temporary files
that nothing removed (or that a writer removed from under another process).
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import cohorts
import dwp
from dwp.io import (
    CorruptFileError,
    FileFormat,
    LibraryFileError,
    atomic_write,
    clean_stale_temporaries,
    corrupt_error_class,
    load_torch_file,
    save_torch_file,
)
from dwp.kernel_bank import KernelBank, KernelBankError
from dwp.kernels import collect_kernels
from dwp.priors import DeepWeightPrior, PretrainedNormalPrior, PriorFileError, load_prior
from dwp.swag import SWAGMomentsError
from unet3d.checkpoint import CheckpointError, read_checkpoint, read_state_dict, save_restart


class ThingError(LibraryFileError):
    pass


THING = FileFormat(tag="test.Thing", version=1, keys=("model",), error=ThingError, what="thing")


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(4, 16, 3), nn.ReLU(), nn.Conv3d(16, 16, 3))


def _flip_middle(path: Path, n: int = 64) -> None:
    """Flip the lowest bit of ``n`` bytes in the middle of the file: inside the tensors'
    data, every float stays finite, so nothing but a checksum can tell."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 - n // 2
    for i in range(start, start + n):
        data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _checkpoint(path: Path) -> Path:
    return save_restart(path, _conv_net(), epoch=3, cycle=0)


def _prior(path: Path) -> Path:
    weight = _conv_net()[2].weight.detach()
    PretrainedNormalPrior(weight, scale_factor=0.1).save(path)
    return path


def _deep_prior() -> DeepWeightPrior:
    torch.manual_seed(0)
    return DeepWeightPrior({"g": dwp.KernelVAE((3, 3, 3), hidden=8)})


def _swag(path: Path) -> Path:
    net = _conv_net().double()
    moments = dwp.SWAGMoments.for_model(net, 2)
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01 * torch.randn_like(p))
        moments.update(net)
    moments.save(path)
    return path


# (writer, reader, the format's error class) for each kind of file dwp writes
FILES = {
    "checkpoint": (_checkpoint, read_checkpoint, CheckpointError),
    "state_dict": (_checkpoint, read_state_dict, CheckpointError),
    "prior": (_prior, load_prior, PriorFileError),
    "deep_prior": (lambda p: _deep_prior().save(p) or p, load_prior, PriorFileError),
    "swag": (_swag, dwp.SWAGMoments.load, SWAGMomentsError),
    "bank": (lambda p: collect_kernels(_conv_net()).save(p) or p, KernelBank.load, KernelBankError),
    "source": (lambda p: save_torch_file(_conv_net().state_dict(), p), load_torch_file, None),
}


# ---------------------------------------------------------------------------------------------
# Flipped bytes, truncation


@pytest.mark.parametrize("kind", sorted(FILES))
def test_a_file_with_flipped_bytes_is_refused_naming_the_file(tmp_path, kind):
    write, read, error = FILES[kind]
    path = tmp_path / f"{kind}.pt"
    write(path)
    read(path)  # intact: loads
    _flip_middle(path)
    with pytest.raises(CorruptFileError, match=rf"^{re.escape(str(path))}: .*corrupt") as caught:
        read(path)
    assert "sha256 expected" in str(caught.value)
    if error is not None:  # still the format's own error, for callers catching that
        assert isinstance(caught.value, error)


@pytest.mark.parametrize("kind", sorted(FILES))
@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_a_truncated_file_is_refused_naming_the_file(tmp_path, kind, keep):
    write, read, error = FILES[kind]
    path = tmp_path / f"{kind}.pt"
    write(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptFileError, match=re.escape(str(path))) as caught:
        read(path)
    assert "truncated or not a torch file" in str(caught.value)
    assert "Invalid argument" not in str(caught.value)
    if error is not None:
        assert isinstance(caught.value, error)


def test_a_sealed_file_is_still_a_plain_torch_file(tmp_path):
    path = THING.save({"model": {"w": torch.arange(4.0)}}, tmp_path / "thing.pt")
    plain = torch.load(path, weights_only=True)  # what older dwp versions do
    assert torch.equal(plain["model"]["w"], torch.arange(4.0))
    assert re.search(rb"dwp\.sha256:[0-9a-f]{64}$", path.read_bytes())


def test_a_legacy_file_without_checksum_loads_and_its_crc_is_checked(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({**THING.header(), "model": _conv_net().state_dict()}, legacy)  # no seal
    assert b"dwp.sha256:" not in legacy.read_bytes()[-200:]
    assert torch.equal(THING.load(legacy)["model"]["0.bias"], _conv_net()[0].bias.detach())
    _flip_middle(legacy)  # torch itself would load this
    with pytest.raises(ThingError, match=rf"^{re.escape(str(legacy))}: .*CRC-32") as caught:
        THING.load(legacy)
    assert isinstance(caught.value, CorruptFileError)


def test_a_corrupt_file_error_survives_pickling():
    # errors travel back from worker processes pickled
    error = corrupt_error_class(PriorFileError)("x.pt: corrupt")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and copy.args == error.args
    assert isinstance(copy, PriorFileError) and isinstance(copy, CorruptFileError)


# ---------------------------------------------------------------------------------------------
# Non-finite weights


def test_a_nan_weight_in_a_state_dict_is_refused_naming_key_and_file(tmp_path):
    state = _conv_net().state_dict()
    state["2.weight"][1, 2, 0, 0, 0] = float("nan")
    path = save_torch_file({**THING.header(), "model": state}, tmp_path / "nan.pt")
    pattern = rf"^{re.escape(str(path))}: .*non-finite.*\['model'\]\['2\.weight'\].*1 NaN"
    with pytest.raises(ThingError, match=pattern):
        THING.load(path)
    with pytest.raises(CheckpointError, match=r"nan\.pt: .*\['model'\]\['2\.weight'\]"):
        read_state_dict(path)
    assert torch.isnan(load_torch_file(path, check_finite=False)["model"]["2.weight"]).any()


def test_a_nan_weight_in_a_prior_file_is_refused_naming_key_and_file(tmp_path):
    path = tmp_path / "prior.pt"
    _deep_prior().save(path)
    payload = load_torch_file(path)
    state = payload["groups"]["g"]["state_dict"]
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key].view(-1)[0] = float("inf")
    save_torch_file(payload, path)  # a valid checksum over a diverged fit
    with pytest.raises(PriorFileError, match=rf"prior\.pt: .*{re.escape(key)}.*1 infinite"):
        load_prior(path)


def test_non_finite_swag_moments_are_refused(tmp_path):
    path = _swag(tmp_path / "swag.pt")
    payload = load_torch_file(path)
    layer = next(iter(payload["sq_mean"]))
    payload["sq_mean"][layer].view(-1)[0] = float("nan")
    save_torch_file(payload, path)
    with pytest.raises(SWAGMomentsError, match=rf"swag\.pt: .*\['sq_mean'\]\['{layer}'\]"):
        dwp.SWAGMoments.load(path)


# ---------------------------------------------------------------------------------------------
# Failed writes


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_names_the_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "prior.pt"
    _prior(path)
    before = path.read_bytes()
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(OSError, match=rf"could not write {re.escape(str(path))}: No space") as e:
        _prior(path)
    assert e.value.errno == errno.ENOSPC
    with (
        pytest.raises(OSError, match=r"could not write .*out\.bin") as e,
        atomic_write(tmp_path / "out.bin") as handle,
    ):
        handle.write(b"half")
        _no_space()  # as a write on a full disk raises
    assert e.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path)) == ["prior.pt"]
    assert path.read_bytes() == before


def test_a_missing_folder_names_the_file(tmp_path):
    target = tmp_path / "missing" / "x.pt"
    with pytest.raises(FileNotFoundError, match=rf"could not write {re.escape(str(target))}"):
        save_torch_file({"w": torch.ones(2)}, target)


# ---------------------------------------------------------------------------------------------
# Orphan temporary files


def _temporary(folder: Path, name: str, age_s: float) -> Path:
    path = folder / name
    path.write_bytes(b"half a file")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_stale_temporaries_are_removed_and_fresh_ones_kept(tmp_path):
    old = _temporary(tmp_path, ".prior.pt.a1b2c3d4.tmp", age_s=7200)
    fresh = _temporary(tmp_path, ".prior.pt.zz_9y8x7.tmp", age_s=5)
    other = _temporary(tmp_path, ".notes.tmp", age_s=7200)  # not atomic_write's pattern
    user = _temporary(tmp_path, "data.a1b2c3d4.tmp", age_s=7200)
    assert clean_stale_temporaries(tmp_path) == [old]
    assert not old.exists() and fresh.exists() and other.exists() and user.exists()
    assert clean_stale_temporaries(tmp_path / "absent") == []
    with pytest.raises(ValueError, match="older_than_s"):
        clean_stale_temporaries(tmp_path, older_than_s=-1)


def test_saving_a_torch_file_removes_its_own_old_orphans_only(tmp_path):
    own_old = _temporary(tmp_path, ".last.pt.a1b2c3d4.tmp", age_s=7200)  # a killed save
    own_fresh = _temporary(tmp_path, ".last.pt.e5f6g7h8.tmp", age_s=5)  # a concurrent save
    other_old = _temporary(tmp_path, ".best.pt.a1b2c3d4.tmp", age_s=7200)
    save_torch_file({"w": torch.ones(2)}, tmp_path / "last.pt")
    assert not own_old.exists() and own_fresh.exists() and other_old.exists()
    assert clean_stale_temporaries(tmp_path, target="best.pt") == [other_old]


def test_a_writer_in_progress_keeps_its_temporary_file(tmp_path):
    # two processes sharing a folder: one cleans while the other writes
    with atomic_write(tmp_path / "cohort.json") as handle:
        handle.write(b"{}")
        assert clean_stale_temporaries(tmp_path) == []
        handle.write(b"\n")
    assert (tmp_path / "cohort.json").read_bytes() == b"{}\n"


def test_cohort_generation_keeps_fresh_temporaries_and_an_unchanged_manifest(tmp_path):
    cohorts.generate("ms_source", tmp_path, 1, resolution=4, progress=False)
    manifest = tmp_path / "cohort.json"
    identity = manifest.stat().st_ino, manifest.stat().st_mtime_ns
    old = _temporary(tmp_path / "imagesTr", ".x.nii.gz.abcdefgh.tmp", age_s=7200)  # killed
    fresh = _temporary(tmp_path, ".cohort.json.abcdefgh.tmp", age_s=1)  # another writer's
    cohorts.generate("ms_source", tmp_path, 1, resolution=4, progress=False)
    assert not old.exists() and fresh.exists()
    assert (manifest.stat().st_ino, manifest.stat().st_mtime_ns) == identity  # not rewritten
