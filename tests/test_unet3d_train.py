"""unet3d.train / unet3d.strategies: every strategy learns, freezing, restarts, resume, DDP."""

import csv
import json
import os
import runpy
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from decathlon import write_decathlon

import cohorts
import dwp
from dwp.priors import DeepWeightSitePrior
from unet3d import UNet3D, kernel3_layers
from unet3d.checkpoint import CheckpointError
from unet3d.config import Augmentation
from unet3d.data import SegmentationDataset, load_decathlon
from unet3d.strategies import (
    STRATEGIES,
    ModelSpec,
    PretrainedFrozenStrategy,
    RandomInitStrategy,
    get_strategy,
)
from unet3d.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
WIDTHS = (2, 4, 4, 8)


class VolumeSet(torch.utils.data.Dataset):
    """Random 16^3 volumes whose foreground is the bright voxels (easy to learn)."""

    def __init__(self, n, seed=0, size=16):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, size, size, size, generator=g)
        self.labels = (self.images[:, 0] > 0.5).long()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def _config(tmp_path, strategy="random_init", **overrides):
    options = dict(
        strategy=strategy,
        out_dir=tmp_path,
        epochs=3,
        lr=1e-2,
        widths=WIDTHS,
        seed=0,
        progress=False,
    )
    options.update(overrides)
    return TrainConfig(**options)


@pytest.fixture(scope="module")
def data():
    return VolumeSet(4, seed=0), VolumeSet(2, seed=1)


@pytest.fixture(scope="module")
def source(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("source")
    train(_config(out, epochs=1), *data)
    return out / "last.pt"


@pytest.fixture(scope="module")
def prior_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("prior") / "prior.pt"
    dwp.DeepWeightPrior({"g": dwp.KernelVAE((3, 3, 3), hidden=4)}).save(path)
    return path


def _options(name, source, prior_file):
    return {
        "random_init": {},
        "pretrained": {"source": source},
        "pretrained_frozen": {"source": source, "freeze_depth": 2},
        "l2_sp": {"source": source, "alpha": 0.1},
        "normal_prior": {"beta": 1.0},
        "dwp": {"prior_path": prior_file, "init": "prior"},
        "prior": {"prior_path": prior_file, "source": source},
    }[name]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_lowers_its_loss(tmp_path, data, source, prior_file, name):
    config = _config(tmp_path, name, strategy_options=_options(name, source, prior_file))
    result = train(config, *data)
    losses = [r["train_loss"] for r in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert all(0 <= r["val_dice"] <= 1 for r in result.history)
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert json.loads((tmp_path / "metrics.json").read_text())[-1]["epoch"] == 2
    if get_strategy(name, **_options(name, source, prior_file)).bayesian:
        assert {"train_kl", "train_data_term", "train_ce", "train_dice"} <= set(rows[0])


def test_frozen_layers_stay_unchanged(tmp_path, data, source):
    strategy = PretrainedFrozenStrategy(source=source, freeze_depth=1)
    result = train(_config(tmp_path, strategy=strategy.name), *data, strategy=strategy)
    before = torch.load(source, weights_only=True)["model"]
    after = result.model.state_dict()
    trainable = ("init_conv.", "out.")
    frozen_names = [k for k in before if not k.startswith(trainable)]
    assert frozen_names and all(torch.equal(before[k], after[k]) for k in frozen_names)
    assert all(not torch.equal(before[k], after[k]) for k in before if k.startswith(trainable))
    # an explicit list overrides the depth
    model = PretrainedFrozenStrategy(source=source, trainable=["up3"]).build_model(
        ModelSpec(widths=WIDTHS)
    )
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"up3"}


@pytest.mark.parametrize("name", ["pretrained", "normal_prior", "dwp"])
def test_a_source_of_other_widths_raises_an_error_naming_the_file(
    tmp_path, source, prior_file, name
):
    options = {"source": source, "init": "pretrained"} if name != "pretrained" else {}
    options = {"source": source, **options}
    if name == "dwp":
        options["prior_path"] = prior_file
    with pytest.raises(CheckpointError, match=f"{source}.*widths"):
        get_strategy(name, **options).build_model(ModelSpec(widths=(4, 4, 4, 8)))


def test_bayesian_strategies_start_from_the_source_network(source, prior_file):
    before = torch.load(source, weights_only=True)["model"]
    for name, extra in (("normal_prior", {}), ("dwp", {"prior_path": prior_file})):
        strategy = get_strategy(name, source=source, init="pretrained", **extra)
        state = strategy.build_model(ModelSpec(widths=WIDTHS)).state_dict()
        assert any(n.endswith("weight_log_sigma") for n in state)  # it is Bayesian...
        for n, value in before.items():  # ...and its posterior means are the source's weights
            assert torch.equal(state[n], value), (name, n)
        assert strategy.describe()["means_start"] == "source network"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"init": "pretrained"}, "He init"),  # no source: the base keeps its He init
        ({"init": "prior"}, "prior samples"),
        ({"init": "fresh"}, "fresh init"),
    ],
)
def test_the_record_says_where_the_means_start(options, expected, prior_file):
    normal = get_strategy("normal_prior", **options).describe()["means_start"]
    assert normal == ("fresh init" if options["init"] == "prior" else expected)  # N(0, 1): none
    dwp_strategy = get_strategy("dwp", prior_path=prior_file, **options)
    assert dwp_strategy.describe()["means_start"] == expected


def test_restarts_write_one_checkpoint_per_cycle(tmp_path, data):
    result = train(_config(tmp_path, epochs=1, restarts=2, lr_patience=0), *data)
    names = sorted(p.name for p in tmp_path.glob("source_restart*.pt"))
    assert names == ["source_restart0.pt", "source_restart1.pt", "source_restart2.pt"]
    assert [r["cycle"] for r in result.history] == [0, 1, 2]
    assert all(r["lr"] == 1e-2 for r in result.history)  # reset at every restart


def test_stops_when_the_learning_rate_reaches_its_floor(tmp_path, data):
    result = train(_config(tmp_path, epochs=50, lr_patience=0, min_lr=1e-2), *data)
    assert result.stop_reason == "min_lr" and len(result.history) == 1


def test_validates_every_k_epochs_and_at_the_end_of_each_cycle(tmp_path, data):
    result = train(_config(tmp_path, epochs=5, val_every=2, restarts=1, lr_patience=0), *data)
    validated = [r["epoch"] for r in result.history if "val_dice" in r]
    assert validated == [1, 3, 4, 6, 8, 9]  # cycle epochs 1, 3 and the last (4), twice
    # the plateau scheduler stepped once per validation of the last cycle, not per epoch
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["scheduler"]["last_epoch"] == 3
    assert result.best_epoch in validated
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert rows[0]["val_dice"] == "" and rows[1]["val_dice"] != ""
    with pytest.raises(ValueError, match="val_every"):
        _config(tmp_path, val_every=0)


class Interrupt(Exception):
    """Raised by a callback to stop a run midway, as a crash would."""


_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    ("device", "precision"),
    [("cpu", "off"), pytest.param("cuda", "off", marks=_NO_CUDA),
     pytest.param("cuda", "fp16", marks=_NO_CUDA)],
)  # fmt: skip
def test_resume_equals_uninterrupted(tmp_path, data, device, precision, monkeypatch):
    # normal_prior samples weight noise: the RNG states must be restored too (the device's
    # generator on a GPU), and fp16's loss scale
    options = {"strategy_options": {"beta": 1.0, "init_log_sigma": -3.0}, "epochs": 4,
               "device": device, "amp": precision}  # fmt: skip
    if device == "cuda":  # bit for bit needs cuDNN's deterministic kernels
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    full = train(_config(tmp_path / "full", "normal_prior", **options), *data)

    def stop_after_two(epoch, record):
        if epoch == 1:
            raise Interrupt

    config = _config(tmp_path / "cut", "normal_prior", **options)
    with pytest.raises(Interrupt):
        train(config, *data, on_epoch_end=stop_after_two)
    assert len(json.loads((tmp_path / "cut" / "metrics.json").read_text())) == 2
    resumed = train(config, *data, resume=True)
    a, b = dict(full.model.named_parameters()), dict(resumed.model.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in full.history]
    # a finished run resumes to itself
    again = train(config, *data, resume=True)
    assert len(again.history) == 4


def _swag_state(path):
    return torch.load(path, weights_only=True)


def _assert_same_moments(a, b):
    assert a["n_snapshots"] == b["n_snapshots"] and a["layers"] == b["layers"]
    for key in ("mean", "sq_mean", "deviations"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_swag_moments_make_a_prior_for_the_same_architecture(tmp_path, data):
    # 2 steps per epoch; from epoch 1 on, every 2nd step: steps 4 and 6
    config = _config(tmp_path, epochs=3, swag_rank=3, swag_start=1, swag_every=2)
    result = train(config, *data)
    moments = dwp.SWAGMoments.load(tmp_path / "swag.pt")
    assert moments.n_snapshots == 2 and moments.rank == 3
    convs = [n for n, m in result.model.named_modules() if isinstance(m, torch.nn.Conv3d)]
    assert list(moments.layers) == convs
    _assert_same_moments(_swag_state(tmp_path / "swag.pt"), result.moments.state_dict())
    prior = dwp.SWAGPrior.load(tmp_path / "swag.pt", scale=0.1)
    net = UNet3D(widths=WIDTHS)
    bayes = dwp.bayesianize(net, prior, include=kernel3_layers(net), init="prior")
    assert torch.isfinite(dwp.kl(bayes))
    other = UNet3D(widths=(4, 4, 4, 8))
    with pytest.raises(dwp.PriorMismatchError, match=r"'init_conv\.weight'.*\(2, 1, 3, 3, 3\)"):
        dwp.bayesianize(other, prior, include=kernel3_layers(other))
    with pytest.raises(ValueError, match="swag_every"):
        _config(tmp_path, swag_every=0)


def test_swag_moments_are_collected_per_restart_cycle(tmp_path, data):
    train(_config(tmp_path, epochs=1, restarts=1, lr_patience=0, swag_rank=2), *data)
    cycles = [dwp.SWAGMoments.load(tmp_path / f"swag_restart{k}.pt") for k in (0, 1)]
    assert [m.n_snapshots for m in cycles] == [2, 2]  # each cycle's own trajectory
    assert not torch.equal(cycles[0].mean("init_conv"), cycles[1].mean("init_conv"))
    _assert_same_moments(
        _swag_state(tmp_path / "swag.pt"), _swag_state(tmp_path / "swag_restart1.pt")
    )


def test_resumed_swag_collection_equals_uninterrupted(tmp_path, data):
    options = {"epochs": 3, "swag_rank": 2}  # 6 snapshots: the ring of 2 columns wraps
    train(_config(tmp_path / "full", **options), *data)

    def stop_after_one(epoch, record):
        raise Interrupt

    config = _config(tmp_path / "cut", **options)
    with pytest.raises(Interrupt):
        train(config, *data, on_epoch_end=stop_after_one)
    assert not (tmp_path / "cut" / "swag.pt").exists()
    train(config, *data, resume=True)
    full, resumed = (_swag_state(tmp_path / d / "swag.pt") for d in ("full", "cut"))
    assert full["n_snapshots"] == 6
    _assert_same_moments(full, resumed)
    # a run without moments cannot be continued as one that collects them
    train(_config(tmp_path / "plain", epochs=1), *data)
    with pytest.raises(CheckpointError, match=r"last\.pt: holds no SWAG moments"):
        train(_config(tmp_path / "plain", epochs=1, swag_rank=2), *data, resume=True)


def test_trains_on_decathlon_cases(tmp_path):
    root = cohorts.generate(
        "tumour_target",
        tmp_path / "data",
        n_train=3,
        resolution=4,
        progress=False,
        whole_tumour=True,
    )
    cases = load_decathlon(root, "train")
    config = _config(tmp_path / "run", epochs=1, size=16, batch_size=2)
    result = train(config, cases[:2], cases[2:])
    assert len(result.history) == 1 and (tmp_path / "run" / "best.pt").is_file()


DDP_SCRIPT = """
import sys

import torch

from unet3d.train import TrainConfig, train


class VolumeSet(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, 16, 16, 16, generator=g)
        self.labels = (self.images[:, 0] > 0.5).long()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def config(out_dir, batch_size):
    return TrainConfig(
        strategy="normal_prior",
        # mean mode: no weight noise, so runs with different process counts are comparable
        strategy_options={"beta": 1.0, "mode": "mean", "init_log_sigma": -3.0, "scale_lr": 1e-5},
        out_dir=out_dir, epochs=2, lr=1e-5, optimizer="sgd", batch_size=batch_size,
        widths=(2, 4, 4, 8), seed=0, progress=False,
    )


def run(out_dir, batch_size):
    return train(config(out_dir, batch_size), VolumeSet(8, 0), VolumeSet(2, 1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], 2)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: Path, *args: Path) -> None:
    """Run ``script`` under torchrun with 2 CPU processes (gloo), one thread each."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), *map(str, args),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_ddp_equals_single_process(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    _torchrun(script, tmp_path / "ddp")
    ddp = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)

    single = runpy.run_path(str(script))["run"](tmp_path / "single", 4)  # global batch 4
    params = dict(single.model.named_parameters())
    assert ddp["step"] == 4 and len(ddp["history"]) == 2
    moved = 0
    for key, value in params.items():
        torch.testing.assert_close(ddp["model"][key], value, atol=1e-6, rtol=1e-5, msg=key)
        if key.endswith("_log_sigma"):
            # only the KL moves them (mean mode): 4 SGD steps of lr * (1 - sigma^2) each;
            # a KL counted twice (or not at all) would be off by ~4e-5 >> atol
            moved += 1
            step = (value + 3.0).abs().max()
            assert 3e-5 < step < 5e-5, (key, step)
    assert moved
    history = torch.load(tmp_path / "single" / "last.pt", weights_only=True)["history"]
    assert history[0]["train_kl"] == pytest.approx(ddp["history"][0]["train_kl"], rel=1e-6)


def test_ddp_equals_single_process_under_natural_scales(tmp_path):
    """The default optimiser of the variational strategies under DDP: in mean mode only the
    KL moves the scales, so each of the 4 steps is the closed-form natural step
    log sigma -= log(1 + x + x^2 / 2) / 2 with x = rate * (sigma^2 - 1) (beta 1, prior
    N(0, 1)); a KL counted once per rank instead of once per step would double x."""
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT).replace('optimizer="sgd"', 'optimizer="natural"'))
    _torchrun(script, tmp_path / "ddp")
    ddp = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    single = runpy.run_path(str(script))["run"](tmp_path / "single", 4)
    log_sigma = torch.tensor(-3.0, dtype=torch.float64)
    for _ in range(4):
        x = 0.1 * (torch.exp(2 * log_sigma) - 1.0)
        log_sigma = log_sigma - 0.5 * torch.log1p(x + x * x / 2)
    for key, value in dict(single.model.named_parameters()).items():
        torch.testing.assert_close(ddp["model"][key], value, atol=1e-6, rtol=1e-5, msg=key)
        if key.endswith("_log_sigma"):
            expected = torch.full_like(value, float(log_sigma))
            torch.testing.assert_close(value.detach(), expected, atol=1e-6, rtol=0, msg=key)


def test_corrupt_checkpoints_raise_errors_naming_the_file(tmp_path):
    from unet3d.checkpoint import CheckpointError
    from unet3d.checkpoint import read_state_dict as load_state_dict

    truncated = tmp_path / "last.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"last\.pt"):
        load_state_dict(truncated)
    foreign = tmp_path / "list.pt"
    torch.save([1, 2, 3], foreign)
    with pytest.raises(CheckpointError, match=r"list\.pt"):
        load_state_dict(foreign)


DDP_RESUME_SCRIPT = """
import sys

import torch
import torch.distributed as dist

from unet3d.train import TrainConfig, train


class VolumeSet(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, 16, 16, 16, generator=g)
        self.labels = (self.images[:, 0] > 0.5).long()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


class Interrupt(Exception):
    pass


def config(out_dir):
    # weight noise and Adam: the RNG and optimiser states must both be resumed
    return TrainConfig(
        strategy="normal_prior", strategy_options={"beta": 1.0, "init_log_sigma": -3.0},
        out_dir=out_dir, epochs=3, lr=1e-2, batch_size=2, widths=(2, 4, 4, 8), seed=0,
        progress=False,
    )


def stop_after_first_epoch(epoch, record):
    if epoch == 0:
        raise Interrupt  # on every rank, after the epoch's checkpoint, as a crash would


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # one group for the three runs; train() joins it
    root = sys.argv[1]
    data = VolumeSet(8, 0), VolumeSet(2, 1)
    train(config(root + "/full"), *data)
    try:
        train(config(root + "/cut"), *data, on_epoch_end=stop_after_first_epoch)
    except Interrupt:
        pass
    else:
        raise SystemExit("the run was not interrupted")
    train(config(root + "/cut"), *data, resume=True)
    dist.destroy_process_group()
"""


def test_ddp_resume_equals_uninterrupted_ddp(tmp_path):
    script = tmp_path / "ddp_resume.py"
    script.write_text(textwrap.dedent(DDP_RESUME_SCRIPT))
    _torchrun(script, tmp_path)
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert full["step"] == resumed["step"] == 6  # 3 epochs of 8 volumes, global batch 4
    for key, value in full["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed["model"][key]), key
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in resumed["history"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in full["history"]]


def test_dwp_training_steps_share_the_forward_weight_sample(
    tmp_path, data, prior_file, monkeypatch
):
    # the bound of every step evaluates the VAE at the weights the forward pass used
    seen = []
    vae_terms = DeepWeightSitePrior._vae_terms

    def recording(self, loc, log_scale, sample):
        seen.append(sample is not None)
        return vae_terms(self, loc, log_scale, sample)

    monkeypatch.setattr(DeepWeightSitePrior, "_vae_terms", recording)
    config = _config(tmp_path, "dwp", epochs=1, strategy_options={"prior_path": prior_file})
    train(config, *data)
    assert seen and all(seen)


# -- L2-SP and the prior-file strategy ----------------------------------------------------------
def _distance_to(source: Path, model: torch.nn.Module) -> float:
    before = torch.load(source, weights_only=True)["model"]
    return sum(float((p.detach() - before[n]).pow(2).sum()) for n, p in model.named_parameters())


def test_l2_sp_interpolates_between_pretrained_and_the_source(tmp_path, data, source):
    """alpha = 0 is ``pretrained`` bit for bit; a large alpha keeps the weights near the
    source network."""
    runs = {}
    for label, name, options in (
        ("pretrained", "pretrained", {"source": source}),
        ("alpha=0", "l2_sp", {"source": source, "alpha": 0.0}),
        ("alpha=100", "l2_sp", {"source": source, "alpha": 100.0}),
    ):
        config = _config(tmp_path / label, name, epochs=2, strategy_options=options)
        runs[label] = train(config, *data)
    pretrained, same = (runs[k].model.state_dict() for k in ("pretrained", "alpha=0"))
    assert all(torch.equal(pretrained[k], same[k]) for k in pretrained)
    losses = [r["train_loss"] for r in runs["alpha=0"].history]
    assert losses == [r["train_loss"] for r in runs["pretrained"].history]
    free = _distance_to(source, runs["pretrained"].model)
    assert 0 < _distance_to(source, runs["alpha=100"].model) < 0.5 * free
    assert runs["alpha=100"].history[-1]["train_l2_sp"] > 0


def test_the_l2_sp_penalty_and_its_gradient(source):
    strategy = get_strategy("l2_sp", source=source, alpha=0.3)
    model = strategy.build_model(ModelSpec(widths=WIDTHS))
    before = torch.load(source, weights_only=True)["model"]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    penalty = strategy.penalty(model)
    params = dict(model.named_parameters())
    assert set(params) <= set(before)  # every parameter is a source-initialised one
    expected = 0.15 * sum((p.detach() - before[n]).pow(2).sum() for n, p in params.items())
    torch.testing.assert_close(penalty.detach(), expected)
    grads = torch.autograd.grad(penalty, list(params.values()))
    for (n, p), g in zip(params.items(), grads, strict=True):
        torch.testing.assert_close(g, 0.3 * (p.detach() - before[n]), msg=n)
    logits = model(torch.randn(1, 1, 16, 16, 16))
    loss, terms = strategy.loss(model, logits, torch.zeros(1, 16, 16, 16).long(), 4, 1, 0)
    assert float(loss.detach()) == pytest.approx(terms["paper_loss"] + terms["l2_sp"], rel=1e-6)
    assert strategy.describe()["alpha"] == 0.3
    with pytest.raises(ValueError, match="alpha >= 0"):
        get_strategy("l2_sp", source=source, alpha=-1.0)


def test_a_prior_file_of_another_kind_trains_through_the_prior_strategy(tmp_path, data, source):
    """A PretrainedNormalPrior template file (centred on the source network when bound) and
    an empirical-Bayes N(0, 1) file train through strategy ``prior``; ``dwp`` refuses them."""
    centred, learned = tmp_path / "centred.pt", tmp_path / "learned.pt"
    dwp.PretrainedNormalPrior(scale_factor=0.1).save(centred)
    dwp.NormalPrior(learn_scale=True).save(learned)
    before = torch.load(source, weights_only=True)["model"]
    options = {"prior_path": centred, "source": source, "beta": 1e-3}
    result = train(_config(tmp_path / "centred", "prior", strategy_options=options), *data)
    layers = dwp.bayesian_layers(result.model)
    assert layers and all(isinstance(m.weight_prior, dwp.PretrainedNormalPrior) for _, m in layers)
    for name, layer in layers:
        assert torch.equal(layer.weight_prior.loc, before[f"{name}.weight"])
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < losses[0], losses
    options = {"prior_path": learned, "beta": 1e-3}
    result = train(_config(tmp_path / "learned", "prior", strategy_options=options), *data)
    scales = dwp.prior_scales(result.model)
    assert len(scales) == len(layers) and all(c < 1.0 for c in scales.values()), scales
    with pytest.raises(dwp.PriorFileError, match=r"centred\.pt"):  # not a deep weight prior
        get_strategy("dwp", prior_path=centred).build_model(ModelSpec(widths=WIDTHS))


def test_dwp_stays_the_prior_strategy_for_deep_weight_priors(prior_file):
    strategy = get_strategy("dwp", prior_path=prior_file)
    assert strategy.init == "prior" and get_strategy("prior", prior_path=prior_file).init == (
        "pretrained"
    )
    assert isinstance(strategy.prior(), dwp.DeepWeightPrior)
    assert strategy.describe()["prior"] == str(prior_file)
    with pytest.raises(ValueError, match=r"strategy 'dwp' needs prior_path=<DeepWeightPrior"):
        get_strategy("dwp").prior()
    with pytest.raises(ValueError, match=r"strategy 'prior' needs prior_path=<Prior file>"):
        get_strategy("prior").prior()


@pytest.mark.parametrize("name", ["normal_prior", "dwp"])
def test_learn_scale_trains_and_logs_the_prior_strength(tmp_path, data, prior_file, name):
    """Empirical Bayes from unet3d: the prior's scale factor is a trained parameter (it
    moves from 1), and every epoch's record holds it per site; without learn_scale none."""
    extra = {"prior_path": prior_file} if name == "dwp" else {}
    options = {"beta": 1.0, "learn_scale": True, **extra}
    result = train(_config(tmp_path / "eb", name, strategy_options=options, epochs=2), *data)
    scales = dwp.prior_scales(result.model)
    assert scales and all(abs(c - 1.0) > 1e-4 for c in scales.values())
    logged = {k[len("train_prior_scale:") :]: v for k, v in result.history[-1].items()
              if k.startswith("train_prior_scale:")}  # fmt: skip
    assert set(logged) == set(scales)
    assert result.history[-1]["step"] > 0
    plain = {"beta": 1.0, **extra}
    result = train(_config(tmp_path / "plain", name, strategy_options=plain, epochs=1), *data)
    assert not dwp.prior_scales(result.model)
    assert not any(k.startswith("train_prior_scale:") for k in result.history[-1])


# ---------------------------------------------------------------------------------------------
# Augmentation (TrainConfig.augmentation)


def test_config_augmentation_round_trips_and_old_configs_default_to_none():
    config = TrainConfig(augmentation=Augmentation(flip_prob=0.25, max_rotation_deg=5.0))
    stored = json.loads(json.dumps(config.as_dict()))  # as checkpoints and config.json hold it
    assert stored["augmentation"] == {
        "flip_prob": 0.25, "rotate_prob": 0.2, "max_rotation_deg": 5.0,
        "intensity_prob": 0.5, "scale": 0.1, "shift": 0.1,
    }  # fmt: skip
    again = TrainConfig(**stored)
    assert again.augmentation == config.augmentation and again.as_dict() == stored
    assert TrainConfig(augmentation=True).augmentation == Augmentation()
    assert TrainConfig(augmentation=False).augmentation is None
    assert TrainConfig(augmentation={"scale": 0.3}).augmentation == Augmentation(scale=0.3)
    del stored["augmentation"]  # a config written before the setting existed
    assert TrainConfig(**stored).augmentation is None
    assert TrainConfig().as_dict()["augmentation"] is None


@pytest.mark.parametrize(
    ("augmentation", "message"),
    [
        ({"flip_prob": 1.5}, r"Augmentation\.flip_prob must be in \[0, 1\], got 1\.5"),
        ({"rotate_prob": -0.1}, r"Augmentation\.rotate_prob must be in \[0, 1\]"),
        ({"intensity_prob": float("nan")}, r"Augmentation\.intensity_prob must be in \[0, 1\]"),
        ({"max_rotation_deg": -1}, r"Augmentation\.max_rotation_deg must be a finite number >= 0"),
        ({"scale": float("inf")}, r"Augmentation\.scale must be a finite number >= 0"),
        ({"shift": "0.1"}, r"Augmentation\.shift must be a number, got '0\.1'"),
        ({"flip": 0.5}, r"augmentation: no field 'flip' in Augmentation \(fields: flip_prob"),
        ("yes", r"augmentation must be an Augmentation, a mapping of its fields"),
    ],
)
def test_bad_augmentation_values_name_the_field(augmentation, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(augmentation=augmentation)


class _RecordingStrategy(RandomInitStrategy):
    """random_init whose network records every input batch with its mode (training or
    validation)."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[tuple[bool, torch.Tensor]] = []

    def build_model(self, spec):
        model = super().build_model(spec)

        def record(module: torch.nn.Module, args: tuple) -> None:
            self.inputs.append((module.training, args[0].clone()))

        model.register_forward_pre_hook(record)
        return model

    def batches(self, training: bool) -> list[torch.Tensor]:
        return [x for mode, x in self.inputs if mode == training]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Four 16^3 Decathlon cases: three to train on, one to validate on."""
    return load_decathlon(write_decathlon(tmp_path_factory.mktemp("decathlon") / "d"), "train")


def _inputs(cases, augmentation, seed=0):
    """The training and validation batches of a 2-epoch run on ``cases`` (one batch each)."""
    strategy = _RecordingStrategy()
    config = _config(
        None, epochs=2, batch_size=3, shuffle=False, augmentation=augmentation, seed=seed
    )
    result = train(config, cases[:3], cases[3:], strategy=strategy)
    return strategy.batches(True), strategy.batches(False), result.model


def test_train_augments_the_training_batches_only_each_epoch_anew_and_reproducibly(cases):
    augmentation = Augmentation(intensity_prob=1.0)  # every volume changes
    plain_train, plain_val, _ = _inputs(cases, None)
    aug_train, aug_val, model = _inputs(cases, augmentation)
    assert len(plain_train) == len(aug_train) == 2 and len(plain_val) == len(aug_val) == 2
    assert torch.equal(plain_train[0], plain_train[1])  # without augmentation, epochs alike
    assert all(not torch.equal(a, p) for a, p in zip(aug_train, plain_train, strict=True))
    assert not torch.equal(aug_train[0], aug_train[1])  # a new draw every epoch
    # validation volumes are never augmented
    assert all(torch.equal(a, p) for a, p in zip(aug_val, plain_val, strict=True))
    # the same seed: the same augmented batches and the same network
    again_train, again_val, again = _inputs(cases, augmentation)
    pairs = zip(again_train + again_val, aug_train + aug_val, strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    for name, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    other_seed, _, _ = _inputs(cases, augmentation, seed=1)
    assert not torch.equal(other_seed[0], aug_train[0])


def test_a_ready_dataset_must_augment_as_the_config_says(cases):
    augmentation = Augmentation(rotate_prob=0.0)
    config = _config(None, epochs=2, batch_size=2, augmentation=augmentation)
    with pytest.raises(ValueError, match=r"the training dataset augments with None, the config"):
        train(config, SegmentationDataset(cases[:3]))
    with pytest.raises(ValueError, match=r"the training dataset augments with Augmentation\("):
        train(_config(None, epochs=1), SegmentationDataset(cases[:3], augment=True))
    augmented_val = SegmentationDataset(cases[3:], augment=augmentation)
    with pytest.raises(ValueError, match=r"the validation dataset augments with Augmentation\("):
        train(config, cases[:3], augmented_val)
    # a Subset of a dataset that augments alike trains, and each epoch draws anew
    ready = SegmentationDataset(cases, augment=augmentation, seed=config.seed)
    train(config, torch.utils.data.Subset(ready, [0, 1]))
    assert ready.epoch == 1


# ---------------------------------------------------------------------------------------------
# Devices (TrainConfig.device, unet3d.devices)

NOISY = {"beta": 1.0, "init_log_sigma": -3.0}  # normal_prior's weight noise uses the RNG


def _without_seconds(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


@pytest.mark.parametrize(("name", "options"), [("random_init", {}), ("normal_prior", NOISY)])
def test_an_explicit_cpu_device_trains_bit_for_bit_as_the_default(tmp_path, data, name, options):
    """device="cpu" (a name or a torch.device) changes nothing: the same weights, history
    and SWAG moments as a config without the setting."""
    results = {
        label: train(
            _config(
                tmp_path / label, name, strategy_options=options, epochs=2, swag_rank=2, **given
            ),
            *data,
        )
        for label, given in [
            ("default", {}),
            ("name", {"device": "cpu"}),
            ("torch", {"device": torch.device("cpu")}),
        ]
    }
    default = results.pop("default")
    for label, result in results.items():
        for key, value in default.model.state_dict().items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, result.model.state_dict()[key]), (label, key)
        assert _without_seconds(result.history) == _without_seconds(default.history), label
        _assert_same_moments(
            _swag_state(tmp_path / "default" / "swag.pt"), _swag_state(tmp_path / label / "swag.pt")
        )


def test_the_device_is_not_part_of_the_run_and_old_configs_load():
    config = TrainConfig(device=torch.device("cpu"))
    assert config.device == "cpu"  # stored as its name
    stored = json.loads(json.dumps(config.as_dict()))
    # checkpoints, resume checks and records never see it: a run may resume elsewhere
    assert "device" not in stored and stored == TrainConfig().as_dict()
    assert TrainConfig(**stored).device == "cpu"  # a config written before the setting


def test_a_run_started_with_the_default_resumes_with_device_cpu(tmp_path, data):
    options = {"strategy_options": NOISY, "epochs": 2}
    full = train(_config(tmp_path / "full", "normal_prior", **options), *data)

    def stop_after_first(epoch, record):
        raise Interrupt

    with pytest.raises(Interrupt):
        train(
            _config(tmp_path / "cut", "normal_prior", **options),
            *data,
            on_epoch_end=stop_after_first,
        )
    config = _config(tmp_path / "cut", "normal_prior", device="cpu", **options)
    resumed = train(config, *data, resume=True)
    for key, value in full.model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert _without_seconds(resumed.history) == _without_seconds(full.history)


def _missing_cuda_device() -> str:
    return f"cuda:{max(torch.cuda.device_count(), 7)}"


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("nonsense", r"^device 'nonsense' is not a torch device"),
        ("gpu", r"^device 'gpu' is not a torch device"),
        (None, r"^device 'cuda:\d+' is not available on this machine \(available: cpu"),
        (0, r"^device must be a str or torch.device, got int"),
    ],
)
def test_a_device_this_machine_lacks_is_refused_naming_device(device, message):
    with pytest.raises(TypeError if device == 0 else ValueError, match=message):
        TrainConfig(device=_missing_cuda_device() if device is None else device)


def test_train_checks_the_device_before_anything_is_written(tmp_path, data):
    config = _config(tmp_path / "run", epochs=1)
    config.device = _missing_cuda_device()  # edited after the config checked it
    with pytest.raises(ValueError, match=r"^device 'cuda:\d+' is not available"):
        train(config, *data)
    assert not (tmp_path / "run").exists()


class _FakeDist:
    """Stands for torch.distributed in unet3d.devices: records the group joined."""

    def __init__(self, initialized: bool = False) -> None:
        self.backend, self.initialized, self.destroyed = None, initialized, False

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return self.initialized

    def init_process_group(self, backend: str) -> None:
        self.backend, self.initialized = backend, True

    def destroy_process_group(self) -> None:
        self.destroyed, self.initialized = True, False

    def get_rank(self) -> int:
        return 1

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self.reduced = tensor.clone()
        tensor.mul_(2)  # the other rank held the same value

    def get_world_size(self) -> int:
        return 2


@pytest.fixture
def torchrun_rank_1(monkeypatch):
    """The environment of torchrun's second process of two on one node."""
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)


def test_ddp_joins_gloo_on_the_cpu(monkeypatch, torchrun_rank_1):
    from unet3d import devices

    fake = _FakeDist()
    monkeypatch.setattr(devices, "dist", fake)
    with devices.process_group(torch.device("cpu")) as where:
        assert where == devices.Placement(1, 2, torch.device("cpu")) and fake.backend == "gloo"
    assert fake.destroyed  # the group train() joined, it leaves


def test_ddp_joins_nccl_on_cuda_with_one_gpu_per_rank(monkeypatch, torchrun_rank_1):
    from unet3d import devices

    fake, current = _FakeDist(), []
    monkeypatch.setattr(devices, "dist", fake)
    # this machine may have no GPU: the placement logic is what is checked here
    monkeypatch.setattr(devices, "resolve_device", lambda device, name="device": device)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    with devices.process_group(torch.device("cuda", 0)) as where:
        assert where == devices.Placement(1, 2, torch.device("cuda", 1))  # cuda:<LOCAL_RANK>
        assert fake.backend == "nccl" and current == [torch.device("cuda", 1)]
    assert fake.destroyed


def test_a_process_group_started_by_the_caller_is_used_and_left_open(monkeypatch, torchrun_rank_1):
    from unet3d import devices

    fake = _FakeDist(initialized=True)
    monkeypatch.setattr(devices, "dist", fake)
    with devices.process_group(torch.device("cpu")) as where:
        assert where.world == 2 and fake.backend is None
    assert not fake.destroyed


def test_one_process_joins_no_group(monkeypatch):
    from unet3d import devices

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(devices, "dist", _FakeDist())
    with devices.process_group(torch.device("cpu")) as where:
        assert where == devices.Placement(0, 1, torch.device("cpu"))
    assert devices.dist.backend is None
    assert devices.mean_over_ranks(0.1, 1, torch.device("cpu")) == 0.1  # no reduction
    assert devices.backend(torch.device("cuda")) == "nccl"
    assert devices.backend(torch.device("cpu")) == "gloo"
    assert devices.rank_device(torch.device("cpu"), 3) == torch.device("cpu")


def test_the_mean_over_ranks_is_reduced_in_float64_where_the_backend_reduces(monkeypatch):
    from unet3d import devices

    fake = _FakeDist(initialized=True)
    monkeypatch.setattr(devices, "dist", fake)
    assert devices.mean_over_ranks(0.1, 2, torch.device("cpu")) == 0.1
    assert fake.reduced.dtype == torch.float64 and fake.reduced.device.type == "cpu"
    # gloo reduces CPU tensors: another accelerator than CUDA reduces there
    assert devices.mean_over_ranks(0.3, 2, torch.device("meta")) == 0.3
    assert fake.reduced.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_cuda_and_its_checkpoints_resume_on_the_cpu(tmp_path, data):
    from unet3d.checkpoint import load_model, read_resume_point

    options = {"strategy_options": NOISY, "swag_rank": 2}
    whole = train(
        _config(tmp_path / "whole", "normal_prior", epochs=1, device="cuda", **options), *data
    )
    assert {p.device.type for p in whole.model.parameters()} == {"cuda"}
    seen = []

    def stop_after_one(epoch, record):  # a finished run resumes to itself: cut this one
        seen.append(record)
        raise Interrupt

    config = _config(tmp_path, "normal_prior", epochs=2, device="cuda", **options)
    with pytest.raises(Interrupt):
        train(config, *data, on_epoch_end=stop_after_one)
    record = seen[0]
    assert all(type(record[k]) is float for k in record if k.startswith(("train_", "val_")))
    point = read_resume_point(tmp_path / "last.pt")
    assert all(v.device.type == "cpu" for v in point.model.values() if torch.is_tensor(v))
    assert {p.device.type for p in load_model(tmp_path / "best.pt").model.parameters()} == {"cpu"}
    resumed = train(_config(tmp_path, "normal_prior", epochs=2, **options), *data, resume=True)
    assert len(resumed.history) == 2 and resumed.history[1]["step"] == 4
    assert {p.device.type for p in resumed.model.parameters()} == {"cpu"}
