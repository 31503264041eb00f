"""Mixed precision (``dwp.amp``, ``TrainConfig.amp``, ``unet3d train --amp``): the forward
pass under bf16 autocast, the KL, the posterior's log-scales and the ELBO in float32.

Tolerances: bf16 keeps 8 significant bits, unit roundoff ``u = 2**-8``.  Autocast rounds
each convolution's input and weight to bf16 (two relative errors <= u) and accumulates in
float32, so to first order the logits of a network whose deepest path has ``L``
convolutions move by at most ``2 u L`` relative to their norm.  The summed cross-entropy is
2-Lipschitz per voxel in the max norm of its logits, which bounds its change by the
logits' measured change.  The KL must not move at all.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

import dwp
from dwp.amp import autocast, check_precision, float32_only, grad_scaler, guard_cpu_bf16_conv3d
from dwp.elbo import _kl
from unet3d import cli
from unet3d.strategies import ModelSpec, get_strategy
from unet3d.train import TrainConfig, train

WIDTHS = (2, 4, 4, 8)
U_BF16 = 2.0**-8


@pytest.fixture(scope="module")
def prior_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("prior") / "prior.pt"
    dwp.DeepWeightPrior({"g": dwp.KernelVAE((3, 3, 3), hidden=4)}).save(path)
    return path


def _batch(seed: int = 0, n: int = 2, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 1, size, size, size, generator=g)
    return image, (image[:, 0] > 0.5).long()


class _Volumes(torch.utils.data.Dataset):
    """24^3 volumes: at 16^3 the U-Net's bottom is 2 voxels deep (guard_cpu_bf16_conv3d)."""

    def __init__(self, n: int, seed: int) -> None:
        self.images, self.labels = _batch(seed, n, size=24)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


# ---------------------------------------------------------------------------------------------
# which precision runs where


@pytest.mark.parametrize(
    ("precision", "device", "message"),
    [
        ("fp16", "cpu", "--amp fp16 needs a CUDA device (device cpu); use --amp bf16"),
        ("int8", "cpu", "--amp must be one of off, bf16, fp16, got 'int8'"),
        ("bf16", "mps", "--amp bf16 is not supported on mps; use --amp off"),
    ],
)
def test_unsupported_precisions_are_refused_naming_the_option(precision, device, message):
    with pytest.raises(ValueError) as error:
        check_precision(precision, device, "--amp")
    assert str(error.value) == message


def test_the_config_checks_its_precision_against_its_device():
    with pytest.raises(ValueError, match=r"^amp fp16 needs a CUDA device"):
        TrainConfig(amp="fp16")
    assert TrainConfig(amp="bf16").as_dict()["amp"] == "bf16"  # part of the run
    assert TrainConfig().amp == "off"


def test_train_amp_error_is_one_line_before_any_data_is_read(tmp_path, capsys):
    argv = ["train", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "out")]
    status = cli.main([*argv, "--amp", "fp16", "--no-progress"])
    err = capsys.readouterr().err
    assert status == cli.EXIT_ERROR
    assert err.strip() == "error: --amp fp16 needs a CUDA device (device cpu); use --amp bf16"
    assert not (tmp_path / "out").exists()


def test_the_grad_scaler_scales_only_fp16():
    assert not grad_scaler("bf16", "cpu").is_enabled()
    assert not grad_scaler("off", "cpu").is_enabled()
    assert grad_scaler("fp16", "cpu").is_enabled()  # fp16 runs on CUDA only (check_precision)


# ---------------------------------------------------------------------------------------------
# what stays float32


def test_the_kl_is_float32_inside_autocast(prior_file):
    """The deep weight prior's bound runs a VAE: unguarded, autocast lowers it."""
    model = get_strategy("dwp", prior_path=prior_file).build_model(ModelSpec(widths=WIDTHS))

    def seeded(kl_of, model):  # the bound is a Monte Carlo estimate: the same draws
        torch.manual_seed(0)
        return kl_of(model)

    exact = seeded(dwp.kl, model)
    with autocast("bf16", "cpu"):
        guarded = seeded(dwp.kl, model)
        per_site = seeded(dwp.kl_per_site, model)
        lowered = seeded(_kl, model)  # what dwp.kl would give without float32_only
    assert guarded.dtype == torch.float32 and torch.equal(guarded, exact)
    assert all(v.dtype == torch.float32 for v in per_site.values())
    assert not torch.equal(lowered, exact)  # so the guard is what keeps it exact
    with autocast("bf16", "cpu"), float32_only("cpu"):
        assert nn.functional.linear(torch.ones(1, 2), torch.ones(3, 2)).dtype == torch.float32


def test_the_loss_under_autocast_matches_float32_within_the_bf16_bound(prior_file):
    strategy = get_strategy("dwp", prior_path=prior_file)
    model = strategy.build_model(ModelSpec(widths=WIDTHS))
    image, label = _batch()
    depth = sum(isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) for m in model.modules())
    depth += sum(isinstance(m, dwp.BayesianLayer) for m in model.modules())

    def loss(precision: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        torch.manual_seed(1)  # the same weight noise in both passes
        with autocast(precision, "cpu"):
            logits = model(image)
        value, terms = strategy.loss(model, logits.float(), label, 8, 2, 0)
        return logits, value, terms

    z32, loss32, terms32 = loss("off")
    z16, loss16, terms16 = loss("bf16")
    assert z16.dtype == torch.bfloat16 and loss16.dtype == torch.float32
    assert terms16["kl"] == terms32["kl"]  # bit for bit
    delta = (z16.float() - z32).norm() / z32.norm()
    assert 0 < delta <= 2 * U_BF16 * depth  # autocast was on, and within its bound
    ce_bound = 2 * (z16.float() - z32).abs().amax(1).sum()  # CE: 2-Lipschitz per voxel
    assert abs(terms16["ce"] - terms32["ce"]) <= float(ce_bound.detach())
    assert abs(float((loss16 - loss32).detach())) <= 2 * U_BF16 * depth * abs(
        float(loss32.detach())
    )


def test_a_bf16_run_learns_with_float32_parameters(tmp_path, prior_file):
    def run(precision: str, out: Path) -> dict[str, list[float]]:
        config = TrainConfig(
            strategy="dwp", strategy_options={"prior_path": prior_file}, out_dir=out,
            epochs=4, lr=1e-2, widths=WIDTHS, progress=False, amp=precision,
        )  # fmt: skip
        result = train(config, _Volumes(4, 0), _Volumes(2, 1))
        assert all(p.dtype == torch.float32 for p in result.model.parameters())
        curves: dict[str, list[float]] = {}  # steps.csv: step, name, value per row
        with (out / "steps.csv").open() as f:
            for row in csv.DictReader(f):
                curves.setdefault(row["name"], []).append(float(row["value"]))
        return curves

    full, mixed = run("off", tmp_path / "fp32"), run("bf16", tmp_path / "bf16")
    assert full["train/kl"][0] == mixed["train/kl"][0]  # same posterior, a float32 KL
    data_term = mixed["train/data_term"]
    assert len(data_term) == 8 and data_term[-1] < data_term[0]  # it learns
    scales = [v for k, v in mixed.items() if k.startswith("posterior_log_sigma/")]
    assert scales and max(abs(v[-1] - v[0]) for v in scales) > 0  # the scales move too


def test_cpu_bf16_refuses_the_depth_where_torch_gets_conv3d_gradients_wrong(tmp_path):
    conv = nn.Sequential(nn.Conv3d(16, 16, 3, padding=1), dwp.BayesConv3d(16, 16, 3, padding=1))
    guard_cpu_bf16_conv3d(conv)
    deep, shallow = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 16, 3, 4, 4)
    with autocast("bf16", "cpu"), pytest.raises(ValueError, match=r"^layer '0': bf16 autocast"):
        conv(deep)
    conv(deep)  # float32: no defect
    with torch.no_grad(), autocast("bf16", "cpu"):
        conv(deep)  # no weight gradients: no defect
    # every other depth: the bf16 weight gradient is float32's within bf16's rounding
    layer = nn.Conv3d(16, 16, 3, padding=1)
    g = torch.randn(1, 16, 3, 4, 4)
    exact = torch.autograd.grad((layer(shallow) * g).sum(), layer.weight)[0]
    with autocast("bf16", "cpu"):
        lowered = torch.autograd.grad((layer(shallow).float() * g).sum(), layer.weight)[0]
    assert (lowered - exact).norm() <= 4 * U_BF16 * exact.norm()
    # and train() installs the guard: 16^3 volumes put the U-Net's bottom at depth 2
    config = TrainConfig(out_dir=tmp_path, epochs=1, widths=(16, 16, 16, 16), amp="bf16",
                         progress=False)  # fmt: skip
    small = _Volumes(2, 0)
    small.images, small.labels = _batch(0, 2, size=16)
    with pytest.raises(ValueError, match=r"^layer '.*': bf16 autocast on the CPU"):
        train(config, small)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_matches_float32_and_trains(tmp_path, prior_file, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    strategy = get_strategy("dwp", prior_path=prior_file)
    model = strategy.build_model(ModelSpec(widths=WIDTHS)).cuda()
    image, label = (t.cuda() for t in _batch(size=24))
    depth = sum(isinstance(m, (nn.Conv3d, nn.ConvTranspose3d, dwp.BayesianLayer))
                for m in model.modules())  # fmt: skip
    # fp16 keeps 11 significant bits (u = 2^-11), bf16 8
    u = U_BF16 if precision == "bf16" else 2.0**-11

    def loss(p: str) -> tuple[torch.Tensor, dict[str, float]]:
        torch.manual_seed(1)
        torch.cuda.manual_seed(1)
        with autocast(p, "cuda"):
            logits = model(image)
        value, terms = strategy.loss(model, logits.float(), label, 8, 2, 0)
        return value.detach(), terms

    loss32, terms32 = loss("off")
    lossmp, termsmp = loss(precision)
    assert termsmp["kl"] == terms32["kl"]
    assert abs(float(lossmp - loss32)) <= 2 * u * depth * abs(float(loss32))
    assert grad_scaler(precision, "cuda").is_enabled() == (precision == "fp16")
    config = TrainConfig(
        strategy="dwp", strategy_options={"prior_path": prior_file}, out_dir=tmp_path,
        epochs=3, lr=1e-2, widths=WIDTHS, progress=False, amp=precision, device="cuda",
    )  # fmt: skip
    result = train(config, _Volumes(4, 0), _Volumes(2, 1))
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    losses = [r["train_loss"] for r in result.history]
    assert all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]
