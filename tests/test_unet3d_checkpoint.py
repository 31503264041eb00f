"""unet3d.checkpoint: the checkpoint format, its version check, and rebuilding networks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dwp
from unet3d import UNet3D, kernel3_layers
from unet3d.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    RunDescription,
    TrainingState,
    load_model,
    load_source,
    read_checkpoint,
    read_resume_point,
    read_run_description,
    read_state_dict,
    save_best,
    save_last,
    save_restart,
)
from unet3d.config import TrainConfig

WIDTHS = (2, 4, 4, 8)


def _run(strategy: str = "random_init") -> RunDescription:
    return RunDescription(TrainConfig(widths=WIDTHS).as_dict(), {"name": strategy})


def _network(bayesian: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = UNet3D(widths=WIDTHS)
    if bayesian:
        model = dwp.bayesianize(model, dwp.NormalPrior(), include=kernel3_layers(model))
    return model


def _write_run(folder: Path, model: torch.nn.Module, run: RunDescription) -> None:
    """best.pt, last.pt and a restart file as :func:`unet3d.train.train` writes them."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    state = TrainingState(epoch=3, cycle=1, cycle_epoch=1, step=6, history=[{"epoch": 0}])
    state.best_val_loss, state.best_epoch = 0.5, 1
    state.restart_checkpoints = [folder / "source_restart0.pt"]
    save_restart(folder / "source_restart0.pt", model, epoch=1, cycle=0)
    save_best(folder / "best.pt", model, run, epoch=1, metrics={"val_loss": 0.5})
    save_last(folder / "last.pt", model, optimizer, scheduler, run, state)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    _write_run(out, _network(bayesian=True), _run("normal_prior"))
    return out


def _assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    state = model.state_dict()
    for key, value in reference.state_dict().items():
        if "_prior." not in key and isinstance(value, torch.Tensor):
            assert torch.equal(state[key], value), key


# ---------------------------------------------------------------------------------------------
# Round trip


def test_every_file_carries_the_header(folder: Path) -> None:
    for name in ("best.pt", "last.pt", "source_restart0.pt"):
        payload = torch.load(folder / name, weights_only=True)
        assert payload["format"] == CHECKPOINT.tag
        assert payload["format_version"] == CHECKPOINT.version
        assert read_checkpoint(folder / name)["model"].keys() == payload["model"].keys()


def test_write_read_rebuild_round_trip(folder: Path) -> None:
    trained = load_model(folder / "best.pt")
    assert trained.bayesian and trained.strategy == {"name": "normal_prior"}
    assert trained.config["widths"] == list(WIDTHS) and trained.epoch == 1
    assert not trained.model.training
    _assert_same_weights(trained.model, _network(bayesian=True))
    # last.pt records the epochs done; its weights are those of the last epoch
    assert load_model(folder / "last.pt").epoch == 2
    assert read_run_description(folder / "last.pt") == _run("normal_prior")


def test_resume_point_restores_the_training_state(folder: Path) -> None:
    point = read_resume_point(folder / "last.pt")
    assert point.state.epoch == 3 and point.state.cycle == 1 and point.state.step == 6
    assert point.state.history == [{"epoch": 0}] and point.state.best_epoch == 1
    assert point.state.restart_checkpoints == [folder / "source_restart0.pt"]
    assert point.optimizer["param_groups"][0]["lr"] == 1e-3
    assert isinstance(point.torch_rng, torch.Tensor)
    with pytest.raises(CheckpointError, match=r"best\.pt: not a unet3d training checkpoint"):
        read_resume_point(folder / "best.pt")


def test_last_pt_keeps_the_swag_collector(folder: Path, tmp_path: Path) -> None:
    model = _network()
    moments = dwp.SWAGMoments.for_model(model, rank=2)
    for _ in range(3):
        with torch.no_grad():
            model.init_conv.weight.add_(0.1)
        moments.update(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    state = TrainingState(epoch=1, step=3)
    save_last(
        tmp_path / "last.pt", model, optimizer, scheduler, _run(), state, moments.state_dict()
    )
    restored = dwp.SWAGMoments.for_model(_network(), rank=2)
    restored.load_state_dict(read_resume_point(tmp_path / "last.pt").swag)
    assert restored.n_snapshots == 3
    assert torch.equal(restored.deviations("init_conv"), moments.deviations("init_conv"))
    # runs without moments, and files written before the entry existed, hold none
    assert read_resume_point(folder / "last.pt").swag is None
    older = _rewritten(folder / "last.pt", tmp_path / "older.pt", swag=None)
    assert "swag" not in torch.load(older, weights_only=True)
    assert read_resume_point(older).swag is None


def test_last_pt_keeps_the_device_generator_and_the_loss_scale(folder, tmp_path, monkeypatch):
    from unet3d import devices, train

    model = _network()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    generator = {"device": "cuda", "state": torch.arange(16, dtype=torch.uint8)}
    scale = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5,
             "growth_interval": 2000, "_growth_tracker": 7}  # fmt: skip
    save_last(
        tmp_path / "last.pt", model, optimizer, scheduler, _run(), TrainingState(epoch=1, step=3),
        device_rng=generator, grad_scaler=scale,
    )  # fmt: skip
    point = read_resume_point(tmp_path / "last.pt")
    assert torch.equal(point.device_rng["state"], generator["state"])
    assert point.grad_scaler == scale
    # a resume restores both: the generator (where it ran) and the scale, not 2^16 again
    restored = []
    monkeypatch.setattr(devices, "restore_device_rng", lambda *a: restored.append(a))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    config = TrainConfig(widths=WIDTHS, seed=4)
    train._start(config, tmp_path, True, _network(), optimizer, scheduler, None, scaler)
    assert scaler.get_scale() == 1024.0 and scaler.state_dict()["_growth_tracker"] == 7
    ((device, saved, seed, step),) = restored
    assert device == torch.device("cpu") and (seed, step) == (4, 3)
    assert torch.equal(saved["state"], generator["state"])
    # files written before these entries existed hold neither
    older = _rewritten(folder / "last.pt", tmp_path / "older.pt", device_rng=None, grad_scaler=None)
    assert read_resume_point(older).device_rng is None
    assert read_resume_point(older).grad_scaler is None


@pytest.mark.parametrize(
    ("saved", "expected"),
    [
        ({"device": "cuda", "state": torch.zeros(8, dtype=torch.uint8)}, "restored"),
        (None, "reseeded"),  # a file from before the entry existed
        ({"device": "mps", "state": torch.zeros(8, dtype=torch.uint8)}, "reseeded"),
    ],
)
def test_a_resumed_accelerator_run_continues_its_noise_stream(saved, expected, monkeypatch):
    from unet3d import devices

    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.append(("restored", s)))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda v: calls.append(("reseeded", v)))
    devices.restore_device_rng(torch.device("cuda", 0), saved, seed=2, step=5)
    assert [c[0] for c in calls] == [expected]
    if expected == "restored":
        assert calls[0][1] is saved["state"]
    calls.clear()
    devices.restore_device_rng(torch.device("cpu"), saved, seed=2, step=5)
    assert calls == []  # the CPU's generator is torch_rng's
    assert devices.device_rng_state(torch.device("cpu")) is None


def test_state_dicts_of_checkpoints_and_raw_files(folder: Path, tmp_path: Path) -> None:
    reference = _network().state_dict()
    raw = tmp_path / "raw.pt"
    torch.save(reference, raw)
    for path in (raw, folder / "source_restart0.pt"):
        state = read_state_dict(path)
        assert all(torch.equal(state[k], v) for k, v in reference.items() if k in state)
    _assert_same_weights(load_source(UNet3D(widths=WIDTHS), raw), _network())
    with pytest.raises(CheckpointError, match=r"raw\.pt: the weights do not fit .*widths"):
        load_source(UNet3D(widths=(4, 4, 4, 8)), raw)


# ---------------------------------------------------------------------------------------------
# Versions


def _rewritten(source: Path, target: Path, **changes) -> Path:
    payload = torch.load(source, weights_only=True)
    for key, value in changes.items():
        if value is None:
            payload.pop(key, None)
        else:
            payload[key] = value
    torch.save(payload, target)
    return target


@pytest.mark.parametrize("name", ["best.pt", "last.pt", "source_restart0.pt"])
def test_a_newer_version_is_rejected_naming_the_file(folder: Path, tmp_path: Path, name: str):
    newer = _rewritten(folder / name, tmp_path / name, format_version=CHECKPOINT.version + 1)
    for read in (read_checkpoint, read_state_dict, load_model):
        with pytest.raises(CheckpointError, match=rf"{name}: .*version .*upgrade"):
            read(newer)


@pytest.mark.parametrize(
    "changes",
    [{"format": "dwp.KernelBank"}, {"format_version": "one"}, {"format_version": True}],
)
def test_an_unknown_format_or_version_is_rejected_naming_the_file(
    folder: Path, tmp_path: Path, changes: dict
) -> None:
    foreign = _rewritten(folder / "best.pt", tmp_path / "foreign.pt", **changes)
    with pytest.raises(CheckpointError, match=r"foreign\.pt: "):
        load_model(foreign)


def _legacy(source: Path, target: Path, version: object = 1) -> Path:
    """A checkpoint as written before the header: ``"version"`` and no ``"format"``."""
    return _rewritten(
        source, target, format=None, format_version=None, dwp_version=None, version=version
    )


def test_version_1_files_without_the_header_are_still_read(folder: Path, tmp_path: Path):
    for name in ("best.pt", "last.pt"):
        _legacy(folder / name, tmp_path / name)
    # restart files never had a version entry
    _rewritten(
        folder / "source_restart0.pt",
        tmp_path / "source_restart0.pt",
        format=None,
        format_version=None,
        dwp_version=None,
    )
    trained = load_model(tmp_path / "best.pt")
    assert trained.bayesian and trained.epoch == 1
    _assert_same_weights(trained.model, _network(bayesian=True))
    assert read_resume_point(tmp_path / "last.pt").state.step == 6
    assert read_state_dict(tmp_path / "source_restart0.pt").keys() == (
        read_state_dict(folder / "source_restart0.pt").keys()
    )


@pytest.mark.parametrize("version", [2, "1", True])
def test_an_unknown_legacy_version_is_rejected_naming_the_file(
    folder: Path, tmp_path: Path, version: object
) -> None:
    legacy = _legacy(folder / "last.pt", tmp_path / "old.pt", version)
    with pytest.raises(CheckpointError, match=r"old\.pt: .*version .*upgrade"):
        read_resume_point(legacy)


def test_files_that_are_no_checkpoint_name_the_file(tmp_path: Path) -> None:
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    no_model = tmp_path / "dict.pt"
    torch.save({"epoch": 1}, no_model)
    for path in (listed, no_model):
        with pytest.raises(CheckpointError, match=rf"{path.name}: not a unet3d checkpoint"):
            read_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"list\.pt: not a state dict"):
        read_state_dict(listed)
