"""The committed source artefact of the transfer benchmark (:mod:`benchmarks.transfer.artefact`):
the quick preset's finds its own, checksums hold, and a changed or mismatched artefact is
rejected with an error naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks import transfer
from benchmarks.stages import stage_folder
from benchmarks.transfer import artefact
from benchmarks.transfer.config import PRIOR, SOURCE

QUICK = transfer.PRESETS["quick"]


def test_the_quick_preset_has_its_committed_artefact_and_its_checksums_hold() -> None:
    """The committed files are those the manifest recorded (SHA-256), and the artefact is
    filed under the hash of the quick preset's source and prior keys: change a source or
    prior setting of ``quick`` and this fails until the artefact is regenerated."""
    data = transfer.data_key(QUICK, 0)
    folder = artefact.locate(QUICK, 0, data)
    assert folder is not None, (
        f"no artefact {artefact.artefact_name(QUICK, 0, data)} in {artefact.ARTEFACTS}: "
        f"regenerate it with {artefact.COMMAND.format(preset='quick', seed=0)}"
    )
    manifest = artefact.verify(folder)
    assert set(manifest["stages"]) == {SOURCE, PRIOR}
    sources = json.loads(next(folder.glob("source-*/sources.json")).read_text())
    assert len(sources["nets"]) == QUICK.source_nets
    # the sources learned: their kernels moved far from initialisation in every group
    assert all(g["relative"] > 0.2 for g in sources["displacement"].values())
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 8e6  # a few MB in the repository
    # another seed has no artefact: its source nets are trained
    assert artefact.locate(QUICK, 1, transfer.data_key(QUICK, 1)) is None


def test_the_full_preset_trains_the_quick_presets_artefact_to_convergence() -> None:
    """``full`` changes only the target runs: it reads quick's committed source nets and
    priors, trains every run until the learning rate reaches its floor, and draws its
    10-volume subsets from a pool large enough that the splits differ."""
    full = transfer.PRESETS["full"]
    assert artefact.artefact_name(full, 0, transfer.data_key(full, 0)) == (
        artefact.artefact_name(QUICK, 0, transfer.data_key(QUICK, 0))
    )
    assert full.steps == 0 and full.epochs >= 100  # no step budget: ReduceLROnPlateau ends
    assert full.pool >= 2 * max(full.sizes)


def _fake_stages(work: Path) -> None:
    """The files an artefact keeps, in the ci preset's stage folders (contents made up:
    the artefact only copies and checks them)."""
    data = transfer.data_key(transfer.PRESETS["ci"], 0)
    for stage, files in artefact.KEEP.items():
        key = transfer.stage_key(transfer.PRESETS["ci"], stage, 0, data)
        folder = stage_folder(work, stage, key)
        for name in files:
            if name != "config.json":
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_text(f"{stage}/{name}")


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    ci = transfer.PRESETS["ci"]
    _fake_stages(tmp_path / "work")
    return artefact.export(ci, 0, transfer.data_key(ci, 0), tmp_path / "work", tmp_path / "art")


def test_export_writes_a_verified_artefact_that_locate_finds(exported: Path) -> None:
    ci = transfer.PRESETS["ci"]
    assert exported.name == artefact.artefact_name(ci, 0, transfer.data_key(ci, 0))
    assert artefact.locate(ci, 0, transfer.data_key(ci, 0), exported.parent) == exported
    manifest = artefact.verify(exported)
    assert len(manifest["files"]) == sum(len(f) for f in artefact.KEEP.values())
    assert not list(exported.parent.glob(".export-*"))  # the staging folder is gone


def test_a_changed_file_is_rejected_naming_it(exported: Path) -> None:
    (prior_file,) = exported.glob("prior-*/prior.pt")
    prior_file.write_text("tampered")
    with pytest.raises(artefact.ArtefactError, match=r"prior\.pt: SHA-256 .* does not match"):
        artefact.verify(exported)
    prior_file.unlink()
    with pytest.raises(artefact.ArtefactError, match=r"prior\.pt: missing"):
        artefact.verify(exported)


def test_an_artefact_whose_configuration_does_not_match_its_hash_is_rejected(
    exported: Path,
) -> None:
    """A setting edited in a stage's config.json (or an artefact filed under another
    configuration's name) no longer hashes to the folder's name."""
    (config,) = exported.glob("source-*/config.json")
    key = json.loads(config.read_text())
    key["settings"]["source_epochs"] += 1
    config.write_text(json.dumps(key))
    with pytest.raises(artefact.ArtefactError, match="made for another configuration"):
        artefact.verify(exported)
    with pytest.raises(artefact.ArtefactError, match="regenerate it: python -m benchmarks"):
        artefact.locate(transfer.PRESETS["ci"], 0, transfer.data_key(transfer.PRESETS["ci"], 0),
                        exported.parent)  # fmt: skip


def test_a_missing_or_broken_manifest_is_rejected(exported: Path) -> None:
    (exported / artefact.MANIFEST).write_text("{not json")
    with pytest.raises(artefact.ArtefactError, match=r"manifest\.json: not a readable"):
        artefact.verify(exported)
    shutil.rmtree(exported)
    ci = transfer.PRESETS["ci"]
    assert artefact.locate(ci, 0, transfer.data_key(ci, 0), exported.parent) is None


def test_the_command_regenerates_an_artefact_bit_for_bit(tmp_path: Path) -> None:
    """Two fresh runs of the documented command (ci preset: seconds) make the same files:
    the priors byte for byte, the source checkpoint's weights bit for bit (it also holds
    its run folder and epoch durations), the summaries but for their timings; ``--check``
    says so and names a file that differs."""
    pytest.importorskip("nilearn")  # the cohorts' anatomy
    from benchmarks.transfer import make_artefact

    args = ["--preset", "ci", "--seed", "0", "--threads", "1", "--no-progress"]
    out = tmp_path / "committed"
    assert make_artefact.main([*args, "--work-dir", str(tmp_path / "a"), "--out", str(out)]) == 0
    check = [*args, "--work-dir", str(tmp_path / "b"), "--out", str(out), "--check"]
    assert make_artefact.main(check) == 0
    (folder,) = out.iterdir()
    assert artefact.differences(folder, tmp_path / "b") == []
    (regenerated,) = (tmp_path / "b").glob("prior-*/kernel_gaussian.pt")
    regenerated.write_bytes(regenerated.read_bytes() + b"\0")
    assert make_artefact.main(check) == 1
    assert [p.rsplit("/", 1)[1] for p in artefact.differences(folder, tmp_path / "b")] == [
        "kernel_gaussian.pt"
    ]
