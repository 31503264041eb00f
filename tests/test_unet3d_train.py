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

import cohorts
import dwp
from dwp.priors import DeepWeightSitePrior
from unet3d import UNet3D, kernel3_layers
from unet3d.checkpoint import CheckpointError
from unet3d.data import load_decathlon
from unet3d.strategies import (
    STRATEGIES,
    ModelSpec,
    PretrainedFrozenStrategy,
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


def test_resume_equals_uninterrupted(tmp_path, data):
    # normal_prior samples weight noise: the RNG state must be restored too
    options = {"strategy_options": {"beta": 1.0, "init_log_sigma": -3.0}, "epochs": 4}
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
