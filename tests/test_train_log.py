"""Watching training (dwp.train_log): per-step scalars to TensorBoard and CSV, their values,
resume without duplicate steps, curves.png, folder and install errors, and the guarantee
that logging changes no trained weight (unet3d.train, regression3d.fit, the benchmarks)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from decathlon import write_decathlon

import dwp
from dwp.extras import MissingExtraError
from dwp.train_log import (
    CSVLogger,
    LogFolderError,
    MultiLogger,
    TensorBoardLogger,
    TrainingLogger,
    plot_curves,
    posterior_log_scales,
    read_csv_log,
    step_scalars,
)
from unet3d.run_files import CURVES, STEP_LOG
from unet3d.strategies import ModelSpec, get_strategy
from unet3d.train import TrainConfig, train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)

WIDTHS = (2, 4, 4, 8)
PNG = b"\x89PNG\r\n\x1a\n"
BAYES = {"beta": 1.0, "init_log_sigma": -3.0}


class VolumeSet(torch.utils.data.Dataset):
    """Random 16^3 volumes whose foreground is the bright voxels; ``fail_after`` items read
    (counted from when it is set) raise, as a run killed in the middle of an epoch."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, 16, 16, 16, generator=g)
        self.labels = (self.images[:, 0] > 0.5).long()
        self.fail_after: int | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.fail_after is not None:
            if self.fail_after == 0:
                raise Killed
            self.fail_after -= 1
        return {"image": self.images[i], "label": self.labels[i]}


class Killed(Exception):
    pass


class Recorder(TrainingLogger):
    """Keeps what it is given."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict[str, float]]] = []
        self.flushed = self.closed = 0

    def log_scalars(self, step, scalars):
        self.rows.append((step, dict(scalars)))

    def flush(self):
        self.flushed += 1

    def close(self):
        self.closed += 1


def _config(out: Path | None, strategy: str = "normal_prior", **overrides) -> TrainConfig:
    options = dict(
        strategy=strategy,
        strategy_options=BAYES if strategy == "normal_prior" else {},
        out_dir=out,
        epochs=2,
        lr=1e-2,
        widths=WIDTHS,
        progress=False,
    )
    return TrainConfig(**{**options, **overrides})


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every parameter and buffer equal, bit for bit."""
    for named in ("named_parameters", "named_buffers"):
        x, y = dict(getattr(a, named)()), dict(getattr(b, named)())
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), named


def _events(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every one
    events.Reload()
    return events


def _scalars(events: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    found = events.Scalars(tag)
    return [e.step for e in found], [e.value for e in found]


@pytest.fixture(scope="module")
def bayes_run(tmp_path_factory: pytest.TempPathFactory):
    """A normal_prior run of 2 epochs x 2 steps, validated every epoch, logged everywhere."""
    root = tmp_path_factory.mktemp("logged")
    config = _config(root / "run", tensorboard=root / "tb")
    result = train(config, VolumeSet(4), VolumeSet(2, seed=1))
    return root, config, result


# ---------------------------------------------------------------------------------------------
# unet3d.train


def test_tensorboard_holds_one_value_per_step_of_every_tag(bayes_run) -> None:
    root, _, result = bayes_run
    events = _events(root / "tb")
    groups = ["init_conv", "down1", "down2", "down3", "down4", "down5", "down6", "up1", "up2"]
    expected = {f"train/{t}" for t in ("loss", "data_term", "kl", "beta", "nll", "ce", "dice")}
    expected |= {"lr/0", "lr/1", "val/loss", "val/dice"}
    expected |= {f"posterior_log_sigma/{g}" for g in [*groups, "up3"]}
    assert set(events.Tags()["scalars"]) == expected
    for tag in expected - {"val/loss", "val/dice"}:
        assert _scalars(events, tag)[0] == [0, 1, 2, 3], tag  # one per optimiser step
    # validation at each epoch's last step, the values of the epoch records
    steps, values = _scalars(events, "val/dice")
    assert steps == [r["step"] - 1 for r in result.history] == [1, 3]
    assert values == pytest.approx([r["val_dice"] for r in result.history], rel=1e-6)
    assert _scalars(events, "train/beta")[1] == [1.0] * 4
    assert _scalars(events, "lr/0")[1] == pytest.approx([1e-2] * 4)


def test_logged_terms_are_the_loop_values(bayes_run) -> None:
    root, config, result = bayes_run
    log = read_csv_log(root / "run" / STEP_LOG)
    events = _events(root / "tb")
    for tag, (steps, values) in log.items():  # TensorBoard holds the same (as float32)
        assert _scalars(events, tag) == (steps, pytest.approx(values, rel=1e-6)), tag
    # the epoch means of metrics.csv are the means of the logged steps
    for epoch, record in enumerate(result.history):
        for term in ("loss", "data_term", "kl", "ce", "dice"):
            mean = sum(log[f"train/{term}"][1][2 * epoch : 2 * epoch + 2]) / 2
            assert record[f"train_{term}"] == pytest.approx(mean, rel=1e-12), term
    # step 0's KL and scales, recomputed from the initial network
    torch.manual_seed(config.seed)
    model = get_strategy("normal_prior", **BAYES).build_model(ModelSpec(widths=WIDTHS))
    assert log["train/kl"][1][0] == pytest.approx(float(dwp.kl(model).detach()), rel=1e-6)
    for group, value in posterior_log_scales(model).items():
        assert value == pytest.approx(-3.0)
        assert log[f"posterior_log_sigma/{group}"][1][0] == pytest.approx(value, rel=1e-6)


def test_curves_png_is_drawn_at_the_end(bayes_run) -> None:
    root, _, _ = bayes_run
    assert (root / "run" / CURVES).read_bytes()[:8] == PNG


def test_logging_changes_no_weight(tmp_path: Path, bayes_run) -> None:
    # normal_prior draws weight noise every step: reading the scales must not move the RNG
    _, _, logged = bayes_run
    plain = train(_config(None), VolumeSet(4), VolumeSet(2, seed=1))  # nothing logged at all
    _assert_same_weights(plain.model, logged.model)


def test_resume_continues_the_step_numbers_without_duplicates(tmp_path: Path) -> None:
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    train(_config(full_dir, epochs=3, tensorboard=full_dir / "tb"), VolumeSet(4))
    data = VolumeSet(4)

    def kill_in_epoch_2(epoch: int, record: dict) -> None:
        if epoch == 1:
            data.fail_after = 2  # the first step of epoch 2 is taken and logged (step 4)

    config = _config(cut_dir, epochs=3, tensorboard=cut_dir / "tb")
    with pytest.raises(Killed):
        train(config, data, on_epoch_end=kill_in_epoch_2)
    assert read_csv_log(cut_dir / STEP_LOG)["train/loss"][0] == [0, 1, 2, 3, 4]
    data.fail_after = None
    train(config, data, resume=True)  # from last.pt of epoch 1: steps 4 and 5 again

    full, cut = read_csv_log(full_dir / STEP_LOG), read_csv_log(cut_dir / STEP_LOG)
    assert cut["train/loss"][0] == list(range(6))
    assert cut == full  # a resumed run is bit for bit the uninterrupted one, and so is its log
    events = _events(cut_dir / "tb")  # step 4 of the killed process is purged
    for tag in ("train/loss", "train/kl", "posterior_log_sigma/down1"):
        steps, values = _scalars(events, tag)
        assert steps == list(range(6)), tag
        assert values == pytest.approx(full[tag][1], rel=1e-6)


def test_only_rank_0_logs_under_ddp(tmp_path: Path) -> None:
    import textwrap

    from test_unet3d_train import DDP_SCRIPT, _torchrun

    script = tmp_path / "ddp_run.py"
    logged = "progress=False, tensorboard=sys.argv[2],"
    script.write_text(textwrap.dedent(DDP_SCRIPT).replace("progress=False,", logged))
    _torchrun(script, tmp_path / "ddp", tmp_path / "tb")
    assert len(list((tmp_path / "tb").iterdir())) == 1  # one events file: rank 0's
    assert _scalars(_events(tmp_path / "tb"), "train/loss")[0] == [0, 1, 2, 3]
    assert read_csv_log(tmp_path / "ddp" / STEP_LOG)["train/kl"][0] == [0, 1, 2, 3]


def test_a_new_run_replaces_the_log_of_the_old_one(tmp_path: Path) -> None:
    config = _config(tmp_path, "random_init", epochs=1, tensorboard=tmp_path / "tb")
    train(config, VolumeSet(4))
    train(config, VolumeSet(4, seed=3), overwrite=True)
    log = read_csv_log(tmp_path / STEP_LOG)
    assert log["train/loss"][0] == [0, 1] and "posterior_log_sigma/down1" not in log
    assert _scalars(_events(tmp_path / "tb"), "train/loss")[0] == [0, 1]


def test_a_bad_tensorboard_folder_stops_the_run_before_its_first_step(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("a file")
    with pytest.raises(LogFolderError, match="taken: cannot write training logs there") as caught:
        train(_config(tmp_path / "run", tensorboard=taken), VolumeSet(4))
    assert "\n" not in str(caught.value) and "it is a file" in str(caught.value)
    assert not (tmp_path / "run" / "last.pt").exists()
    with pytest.raises(LogFolderError, match="Not a directory"):
        TensorBoardLogger(taken / "below")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / STEP_LOG).write_text("someone else's table\n")  # never overwritten
    with pytest.raises(LogFolderError, match=r"steps\.csv: not a training log"):
        train(_config(tmp_path / "mine", tensorboard=tmp_path / "tb"), VolumeSet(4))
    assert (tmp_path / "mine" / STEP_LOG).read_text() == "someone else's table\n"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_folder_is_named(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(LogFolderError, match="locked: cannot write training logs there"):
        TensorBoardLogger(locked)


def test_missing_tensorboard_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(MissingExtraError, match=r'pip install "dwp\[tensorboard\]"'):
        TensorBoardLogger(tmp_path / "tb")
    with pytest.raises(MissingExtraError, match=r"TrainConfig\.tensorboard"):
        train(_config(tmp_path / "run", tensorboard=tmp_path / "tb"), VolumeSet(4))


def test_the_config_leaves_where_it_is_watched_from_out() -> None:
    # not in checkpoints, resume checks or benchmark records: those stay as they were
    assert "tensorboard" not in TrainConfig(tensorboard="tb").as_dict()
    assert TrainConfig(tensorboard="tb").as_dict() == TrainConfig().as_dict()


# ---------------------------------------------------------------------------------------------
# The loggers


def test_csv_logger_round_trips_and_purges_on_reopening(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "log.csv"
    with CSVLogger(path) as log:
        for step in range(4):
            log.log_scalars(step, {"a": step / 3, "b": -step})
        log.log_scalars(3, {"val": math.nan})
    curves = read_csv_log(path)
    assert curves["a"] == ([0, 1, 2, 3], [0.0, 1 / 3, 2 / 3, 1.0])  # exact floats
    assert math.isnan(curves["val"][1][0])
    with path.open("a") as handle:  # a row cut short by a kill
        handle.write("4,a,0.12")
    with CSVLogger(path, purge_step=2) as log:
        log.log_scalars(2, {"a": 5.0})
    assert read_csv_log(path)["a"] == ([0, 1, 2], [0.0, 1 / 3, 5.0])
    with CSVLogger(path):  # purge_step=None keeps every whole row
        pass
    assert read_csv_log(path)["b"] == ([0, 1], [0.0, -1.0])
    (tmp_path / "other.csv").write_text("x,y\n1,2\n")
    with pytest.raises(LogFolderError, match=r"other\.csv: not a training log"):
        CSVLogger(tmp_path / "other.csv")


def test_multi_logger_closes_every_logger_even_when_one_fails() -> None:
    class Failing(Recorder):
        def close(self):
            raise OSError("disk gone")

    first, second = Failing(), Recorder()
    logger = MultiLogger(first, second)
    logger.log_scalars(7, {"x": 1.0})
    logger.flush()
    with pytest.raises(OSError, match="disk gone"):
        logger.close()
    assert second.rows == [(7, {"x": 1.0})] and second.flushed == 1 and second.closed == 1


def test_scales_are_grouped_by_prior_group_else_by_top_level_module() -> None:
    torch.manual_seed(0)
    kernel = dwp.DeepWeightPrior({"g": dwp.KernelVAE((3, 3, 3), hidden=4)})
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 2, 3), torch.nn.Conv3d(2, 2, 3), torch.nn.Conv3d(2, 2, 1)
    )
    net = dwp.bayesianize(net, kernel, include=["0", "1"], init_log_sigma=-2.0)
    net = dwp.bayesianize(net, init_log_sigma=-4.0, inplace=True)  # the 1x1x1 conv: N(0, 1)
    with torch.no_grad():
        net[1].weight_log_sigma.fill_(-1.0)
    # 54 weights at -2 and 108 at -1: each weight counts once (-4 / 3), not each layer (-1.5)
    assert posterior_log_scales(net) == {"g": pytest.approx(-4 / 3), "2": pytest.approx(-4.0)}
    optimiser = dwp.optim.build_optimizer("adam", net, 1e-3, scale_lr=1e-4)
    scalars = step_scalars({"loss": 2.0}, net, optimiser)
    assert scalars["train/loss"] == 2.0 and scalars["lr/0"] == 1e-3 and scalars["lr/1"] == 1e-4
    assert posterior_log_scales(torch.nn.Conv3d(1, 1, 3)) == {}


def test_curves_need_matplotlib_only_to_draw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    panels = {"loss": {"train": ([0, 1, 2], [3.0, 2.0, 1.0])}, "empty": {"x": ([], [])}}
    long = {"loss": {"train": (list(range(5000)), [1.0 + i % 7 for i in range(5000)])}}
    assert plot_curves(tmp_path / "a.png", long, log_y=("loss",))
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.warns(UserWarning, match="need matplotlib"):
        assert not plot_curves(tmp_path / "b.png", panels)
    assert not (tmp_path / "b.png").exists()


# ---------------------------------------------------------------------------------------------
# regression3d.fit


def test_regression_fit_logs_every_step_and_trains_the_same_weights() -> None:
    from regression3d import BaseRegressor, HydraConfig, fit, make_bayesian
    from regression3d import TrainConfig as FitConfig

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 8, 8, 8, generator=g)
    y = x.mean((1, 2, 3, 4))

    def fitted(hydranet: HydraConfig | None, logger: TrainingLogger | None):
        torch.manual_seed(0)
        net = make_bayesian(BaseRegressor(1, 1, (2, 2)), init_log_sigma=-3.0)
        config = FitConfig(steps=12, beta=0.1, kl_warmup=6, hydranet=hydranet)
        return fit(net, x, y, config, logger=logger)

    for hydranet in (None, HydraConfig(2, 0.1)):
        recorder = Recorder()
        logged, plain = fitted(hydranet, recorder), fitted(hydranet, None)
        _assert_same_weights(logged.model, plain.model)
        assert [step for step, _ in recorder.rows] == list(range(12))
        assert recorder.flushed == 1 and recorder.closed == 0  # the caller closes it
        for row in logged.history:  # every 10th step: the loop's own values
            scalars = recorder.rows[row["step"]][1]
            for term in ("loss", "nll", "kl", "beta"):
                assert scalars[f"train/{term}"] == pytest.approx(row[term], rel=1e-6), term
            # loss = data term + beta * KL
            kl_part = scalars["train/beta"] * scalars["train/kl"]
            assert scalars["train/loss"] == pytest.approx(scalars["train/data_term"] + kl_part)
        assert {"lr/0", "lr/1", "posterior_log_sigma/blocks"} <= set(recorder.rows[0][1])


# ---------------------------------------------------------------------------------------------
# The command lines


def test_unet3d_train_tensorboard_option(tmp_path: Path, capsys, monkeypatch) -> None:
    from unet3d import cli

    data = write_decathlon(tmp_path / "data", 4, test_shape=None)
    argv = ["train", "--data", str(data), "--widths", "2", "4", "4", "8", "--size", "16"]
    argv += ["--epochs", "1", "--batch-size", "2", "--no-progress"]
    assert (
        cli.main([*argv, "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")])
        == 0
    )
    assert _scalars(_events(tmp_path / "tb"), "train/loss")[0] == [0, 1]
    assert (tmp_path / "run" / CURVES).read_bytes()[:8] == PNG
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert "tensorboard" not in config["config"]

    (tmp_path / "file").write_text("")
    capsys.readouterr()
    status = cli.main(
        [*argv, "--out", str(tmp_path / "bad"), "--tensorboard", str(tmp_path / "file")]
    )
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "file: cannot write training logs" in err
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    status = cli.main([*argv, "--out", str(tmp_path / "no"), "--tensorboard", str(tmp_path / "tb")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "--tensorboard needs TensorBoard" in err and 'pip install "dwp[tensorboard]"' in err


def test_transfer_cells_log_into_their_own_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    from types import SimpleNamespace

    from benchmarks import transfer
    from benchmarks.transfer import cells, execution

    seen = {}

    def train_only_to_see(config, *args, **kwargs):
        seen["config"] = config
        raise Killed

    monkeypatch.setattr(cells, "train", train_only_to_see)
    preset = transfer.PRESETS["ci"]
    cell = cells.Cell("dwp", preset.sizes[0], 0)
    events = tmp_path / "tb" / "dwp-0123abcd" / cell.folder()
    task = execution.Task(cell, preset, tmp_path / "run", {}, 0, events)
    datasets = SimpleNamespace(pool=list(range(preset.pool)), val=None)
    with pytest.raises(Killed):
        execution._run_task(task, (None, datasets))
    assert seen["config"].tensorboard == events
    assert "tensorboard" not in seen["config"].as_dict()  # the record of result.json

    (tmp_path / "file").write_text("")
    args = ["--preset", "ci", "--work-dir", str(tmp_path / "work"), "--no-progress"]
    assert transfer.main([*args, "--tensorboard", str(tmp_path / "file")]) == 2
    assert "cannot write training logs" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # refused before any stage


def test_regression_benchmark_logs_each_network(tmp_path: Path) -> None:
    pytest.importorskip("nilearn")  # the cohorts' anatomy
    from benchmarks import regression

    tb = tmp_path / "tb"
    args = ["--preset", "ci", "--seed", "1", "--out", str(tmp_path / "out"), "--threads", "1"]
    args += ["--work-dir", str(tmp_path / "work")]
    assert regression.main([*args, "--tensorboard", str(tb)]) == 0
    runs = sorted(str(p.parent.relative_to(tb)) for p in tb.rglob("events.out.tfevents.*"))
    assert runs == sorted(
        [f"bagnet/rf{rf}_{t}" for rf in regression.RECEPTIVE_FIELDS for t in ("age", "sex")]
        + ["source/net0", "source/net1"]
        + [f"hydranet/n12_seed1/{m}" for m in regression.METHODS]
    )
    events = _events(tb / "hydranet" / "n12_seed1" / "base_dwp")
    assert _scalars(events, "train/kl")[0] == [0, 1]  # ci: two steps per network
    # the deep weight prior's group (its 3x3x3 convs) and the other layers' block
    assert {"posterior_log_sigma/all", "posterior_log_sigma/head"} <= set(events.Tags()["scalars"])
