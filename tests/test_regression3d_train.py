"""Regression training with the Bayesian layer API: deterministic, N(0, 1) prior, deep
weight prior fitted on source regressors' kernels, Hydranet sets; predictions with
epistemic variance."""

from __future__ import annotations

import pytest
import torch

import dwp
from dwp.priors.deep import DeepWeightSitePrior
from regression3d import (
    BaseRegressor,
    FittedModel,
    HydraConfig,
    TrainConfig,
    bagnet3d,
    fit,
    kernel3_convs,
    make_bayesian,
    pearson_r,
)

SHAPE = (1, 8, 8, 8)


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose target is their mean intensity (learnable by conv + average pooling)."""
    g = torch.Generator().manual_seed(seed)
    level = torch.rand(n, generator=g) * 2
    x = level.view(n, 1, 1, 1, 1) + 0.3 * torch.randn(n, *SHAPE, generator=g)
    return x, x.mean((1, 2, 3, 4))


@pytest.fixture(scope="module")
def deep_prior() -> dwp.DeepWeightPrior:
    """A small DWP on the 3x3x3 kernels of two source regressors trained on the toy task."""
    x, y = _data(32, seed=1)
    sources = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        sources.append(
            fit(BaseRegressor(1, 1, (4, 4)), x, y, TrainConfig(steps=20, seed=seed)).model
        )
    bank = dwp.collect_kernels(sources, group_by="all", kernel_shape=(3, 3, 3))
    assert len(bank) == 2 * (1 * 4 + 4 * 4 + 5 * 4 + 4 * 4)
    return dwp.DeepWeightPrior.fit(bank, epochs=5, progress=False, latent_dim=2)


def test_deterministic_fit_learns_and_has_zero_epistemic_variance() -> None:
    torch.manual_seed(0)
    x, y = _data(24, seed=0)
    fitted = fit(BaseRegressor(1, 1, (4, 4)), x, y, TrainConfig(steps=60, lr=1e-2))
    assert isinstance(fitted, FittedModel) and not fitted.bayesian
    mean, variance = fitted.predict(x, n_samples=4)
    assert mean.shape == variance.shape == (24, 1)
    assert torch.equal(variance, torch.zeros_like(variance))
    assert pearson_r(y, mean[:, 0]) > 0.8  # measured 0.99
    assert fitted.history[-1]["nll"] < fitted.history[0]["nll"]


def test_bayesian_fit_with_a_normal_prior_predicts_mean_and_variance() -> None:
    torch.manual_seed(0)
    x, y = _data(24, seed=0)
    bnn = make_bayesian(BaseRegressor(1, 1, (4, 4)), dwp.NormalPrior())
    assert len(dwp.bayesian_layers(bnn)) == 5  # four convs and the head
    fitted = fit(bnn, x, y, TrainConfig(steps=60, lr=1e-2, beta=1e-3))
    assert fitted.bayesian
    assert fitted.history[-1]["kl"] > 0
    mean, variance = fitted.predict(x, n_samples=8)
    assert mean.shape == variance.shape == (24, 1)
    assert bool((variance > 0).all())
    assert pearson_r(y, mean[:, 0]) > 0.5


def test_bayesian_fit_learns_its_scales_by_default_and_adam_is_selectable() -> None:
    """``optimizer="auto"``: natural-gradient scales for a Bayesian net (they move off
    their fan-in start within 60 steps); ``"adam"`` at ``scale_lr`` 1e-4 barely moves them;
    a Bayesian-only optimiser on a deterministic net is an error naming it."""
    x, y = _data(24, seed=0)

    def moved(optimizer: str) -> float:
        torch.manual_seed(0)
        bnn = make_bayesian(BaseRegressor(1, 1, (4, 4)), dwp.NormalPrior())
        start = torch.cat(
            [layer.weight_log_sigma.detach().flatten() for _, layer in dwp.bayesian_layers(bnn)]
        )
        fit(bnn, x, y, TrainConfig(steps=60, lr=1e-2, beta=1e-3, optimizer=optimizer))
        end = torch.cat(
            [layer.weight_log_sigma.detach().flatten() for _, layer in dwp.bayesian_layers(bnn)]
        )
        return float((end - start).abs().mean())

    assert moved("auto") > 0.5 > 0.01 > moved("adam")
    with pytest.raises(ValueError, match="optimizer 'natural' updates posterior scales"):
        fit(BaseRegressor(1, 1, (4, 4)), x, y, TrainConfig(steps=1, optimizer="natural"))


def test_bayesian_fit_with_a_deep_weight_prior(deep_prior: dwp.DeepWeightPrior) -> None:
    torch.manual_seed(0)
    x, y = _data(16, seed=2)
    net = BaseRegressor(1, 1, (4, 4))
    bnn = make_bayesian(net, kernel_prior=deep_prior, init="prior")
    for name in kernel3_convs(net):
        assert isinstance(bnn.get_submodule(name).weight_prior, DeepWeightSitePrior)
    assert isinstance(bnn.head.weight_prior, dwp.NormalPrior)
    assert dwp.kl(bnn).requires_grad
    fitted = fit(bnn, x, y, TrainConfig(steps=15, lr=1e-2, beta=1e-2, kl_warmup=10))
    mean, variance = fitted.predict(x[:4], n_samples=4)
    assert mean.shape == (4, 1) and bool((variance > 0).all())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in fitted.history)


def test_hydranet_training_and_bagnet_classification_run() -> None:
    torch.manual_seed(0)
    x, y = _data(12, seed=3)
    counts = torch.stack([y, 2 * y], 1)  # two additive targets at once
    config = TrainConfig(steps=6, batch_size=8, hydranet=HydraConfig(4, 0.1))
    fitted = fit(BaseRegressor(1, 2, (2, 2)), x, counts, config)
    assert torch.equal(fitted.shift, torch.zeros(2))  # sums must stay sums
    assert fitted.predict(x[:2])[0].shape == (2, 2)

    labels = (y > y.median()).long()
    clf = fit(
        bagnet3d(9, width=1, out_features=2, norm="channel"),
        x,
        labels,
        TrainConfig(steps=3),
        task="classification",
    )
    probs, _ = clf.predict(x[:3])
    torch.testing.assert_close(probs.sum(1), torch.ones(3))


@pytest.mark.parametrize("centre", [False, True])
def test_hydranet_first_loss_is_the_set_sum_mse_of_its_sets(centre: bool) -> None:
    # The loss of step 0 is the mean over the step's sets of the summed Gaussian NLL of
    # (sum of the members' predictions, sum of the kept members' scaled targets): centred
    # targets (zero images count as 0, i.e. the training mean) or only scaled ones.
    import copy

    from regression3d import draw_sets, set_members, set_sum, set_targets

    torch.manual_seed(0)
    x, y = _data(6, seed=5)
    net = BaseRegressor(1, 1, (2, 2))
    reference = copy.deepcopy(net)
    hydra = HydraConfig(3, 0.3, centre=centre, sets_per_step=2)
    fitted = fit(net, x, y, TrainConfig(steps=1, seed=4, hydranet=hydra, noise_scale=0.5))
    shift = y.mean() if centre else torch.tensor(0.0)
    assert torch.allclose(fitted.shift, shift.view(1))
    z = ((y - shift) / y.std()).view(-1, 1)
    sets = draw_sets(6, 3, 0.3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        total = set_sum(reference, set_members(x, sets))
    expected = dwp.likelihoods.gaussian_nll(total, set_targets(z, sets), 0.5) / len(sets)
    assert fitted.history[0]["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_hydranet_steps_take_sets_per_step_sets_across_epochs() -> None:
    from regression3d.train import _batches

    config = TrainConfig(hydranet=HydraConfig(4, 0.0, sets_per_step=5))
    batches = _batches(10, config, torch.Generator().manual_seed(0))
    steps = [next(batches) for _ in range(3)]  # 3 sets per epoch: 15 sets = 5 epochs
    assert all(len(b) == 5 for b in steps)
    index = torch.cat([b.index for b in steps]).flatten()
    keep = torch.cat([b.keep for b in steps]).flatten()
    for epoch in range(5):  # every epoch uses each item once; its last set is padded
        part, kept = index[12 * epoch : 12 * (epoch + 1)], keep[12 * epoch : 12 * (epoch + 1)]
        assert sorted(part[kept].tolist()) == list(range(10))
        assert int(kept.sum()) == 10
    # the default: batch_size // set_size sets per step
    default = _batches(10, TrainConfig(batch_size=8, hydranet=HydraConfig(4)), torch.Generator())
    assert len(next(default)) == 2
    with pytest.raises(ValueError, match="sets_per_step"):
        HydraConfig(sets_per_step=0)


def test_hydranet_members_per_pass_changes_memory_not_the_fit() -> None:
    x, y = _data(8, seed=6)
    fits = []
    for members_per_pass in (None, 1):
        torch.manual_seed(0)
        hydra = HydraConfig(4, 0.25, sets_per_step=2, members_per_pass=members_per_pass)
        fitted = fit(BaseRegressor(1, 1, (2, 3)), x, y, TrainConfig(steps=4, hydranet=hydra))
        fits.append(fitted)
    one_pass, streamed = fits
    for a, b in zip(one_pass.model.parameters(), streamed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert [h["loss"] for h in one_pass.history] == pytest.approx(
        [h["loss"] for h in streamed.history], rel=1e-5
    )
    with pytest.raises(ValueError, match="members_per_pass"):
        HydraConfig(members_per_pass=0)


def test_adadelta_and_augmentation_train_a_deterministic_net_only() -> None:
    from regression3d import RigidAugmentation
    from regression3d.train import _optimiser

    x, y = _data(8, seed=7)
    config = TrainConfig(steps=3, optimizer="adadelta", lr=1.0)
    net = BaseRegressor(1, 1, (2, 2))
    schedule = dwp.KLSchedule("constant", end=1.0)
    assert isinstance(_optimiser(net, config, schedule, False), torch.optim.Adadelta)
    before = [p.detach().clone() for p in net.parameters()]
    fitted = fit(net, x, y, config, augment=RigidAugmentation(seed=0))
    assert any(
        not torch.equal(a, b) for a, b in zip(before, fitted.model.parameters(), strict=True)
    )
    bnn = make_bayesian(BaseRegressor(1, 1, (2, 2)))
    with pytest.raises(ValueError, match="adadelta"):
        fit(bnn, x, y, config)


def test_feature_scale_keeps_the_initial_function() -> None:
    x = torch.randn(2, 1, 6, 6, 6)
    torch.manual_seed(0)
    plain = BaseRegressor(1, 2, (2, 3))
    torch.manual_seed(0)
    scaled = BaseRegressor(1, 2, (2, 3), feature_scale=100.0)
    torch.testing.assert_close(plain(x), scaled(x))
    with pytest.raises(ValueError, match="feature_scale"):
        BaseRegressor(feature_scale=0.0)


def test_bad_training_inputs_are_rejected() -> None:
    x, y = _data(4, seed=0)
    with pytest.raises(ValueError, match="labels"):
        fit(BaseRegressor(1, 1, (2,)), x, y[:3])
    with pytest.raises(ValueError, match="NaN"):
        fit(BaseRegressor(1, 1, (2,)), x, torch.full((4,), float("nan")))
    with pytest.raises(ValueError, match="integers"):
        fit(BaseRegressor(1, 2, (2,)), x, y, task="classification")
    with pytest.raises(ValueError, match="3x3x3"):
        make_bayesian(torch.nn.Linear(2, 1), kernel_prior=dwp.NormalPrior())


# -- the device option ----------------------------------------------------------------------
def _fit_on(device: str | torch.device | None, hydranet: HydraConfig | None = None) -> FittedModel:
    """A small Bayesian fit; ``device=None``: the config's default."""
    x, y = _data(8, seed=8)
    torch.manual_seed(0)
    bnn = make_bayesian(BaseRegressor(1, 1, (2, 2)))
    options = {} if device is None else {"device": device}
    config = TrainConfig(steps=4, beta=1e-2, hydranet=hydranet, **options)
    return fit(bnn, x, y, config)


@pytest.mark.parametrize("hydranet", [None, HydraConfig(4, 0.25, members_per_pass=2)])
def test_default_and_explicit_cpu_device_train_the_same_weights(hydranet) -> None:
    fits = [_fit_on(d, hydranet) for d in (None, "cpu", torch.device("cpu"))]
    assert TrainConfig().device == "cpu"
    reference = fits[0].model.state_dict()
    for fitted in fits[1:]:
        state = fitted.model.state_dict()
        assert state.keys() == reference.keys()
        for key, value in reference.items():  # tensors, and the priors' extra state
            same = torch.equal(state[key], value) if torch.is_tensor(value) else state[key] == value
            assert same, key
        assert fitted.history == fits[0].history
    x, _ = _data(3, seed=9)
    predictions = []
    for fitted in fits:
        torch.manual_seed(1)
        predictions.append(fitted.predict(x, n_samples=2))
    assert all(torch.equal(p[0], predictions[0][0]) for p in predictions)
    assert TrainConfig(device=torch.device("cpu")).as_dict()["device"] == "cpu"  # JSON-ready


def test_a_bad_or_missing_device_is_rejected_before_training() -> None:
    x, y = _data(4, seed=0)
    net = BaseRegressor(1, 1, (2,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: never there
    cases = [
        ("gpu", r"^device 'gpu' is not a torch device"),
        (missing, rf"^device '{missing}' is not available on this machine \(available: cpu"),
        ("meta", r"^device 'meta' is not supported"),
    ]
    for device, message in cases:
        with pytest.raises(ValueError, match=message):
            fit(net, x, y, TrainConfig(steps=2, device=device))
    after = net.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # not trained, not moved


def test_the_fitted_model_keeps_cpu_scaling_and_predicts_cpu_tensors() -> None:
    fitted = _fit_on("cpu")
    assert fitted.shift.device.type == fitted.scale.device.type == "cpu"
    mean, variance = fitted.predict(_data(2, seed=9)[0], n_samples=2)
    assert mean.device.type == variance.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_moves_the_model_and_the_batches_not_the_data() -> None:
    x, y = _data(8, seed=8)
    for hydranet in (None, HydraConfig(4, 0.25, members_per_pass=2)):
        torch.manual_seed(0)
        bnn = make_bayesian(BaseRegressor(1, 1, (2, 2)))
        config = TrainConfig(steps=4, beta=1e-2, hydranet=hydranet, device="cuda")
        fitted = fit(bnn, x, y, config)
        assert all(p.device.type == "cuda" for p in fitted.model.parameters())
        assert x.device.type == "cpu" and fitted.shift.device.type == "cpu"
        assert all(torch.isfinite(torch.tensor(h["loss"])) for h in fitted.history)
        mean, variance = fitted.predict(x[:3], n_samples=2)
        assert mean.device.type == variance.device.type == "cpu" and mean.shape == (3, 1)


@pytest.mark.parametrize("hydranet", [False, True], ids=["base", "hydranet"])
def test_bf16_fit_matches_float32_first_loss_and_learns(hydranet: bool) -> None:
    # bf16 rounds each conv's input and weight (2 u relative, u = 2^-8) on the L layers of
    # the network's deepest path; the loss of step 0 moves by at most ~2 u L of its value
    x, y = _data(8, seed=6)
    hydra = HydraConfig(2, 0.0, sets_per_step=2) if hydranet else None

    def run(amp: str):
        torch.manual_seed(0)
        net = BaseRegressor(1, 1, (4, 4))
        config = TrainConfig(steps=30, seed=3, hydranet=hydra, amp=amp, lr=3e-3)
        return net, fit(net, x, y, config)

    net, full = run("off")
    _, mixed = run("bf16")
    layers = sum(isinstance(m, torch.nn.Conv3d | torch.nn.Linear) for m in net.modules())
    first32, first16 = full.history[0]["loss"], mixed.history[0]["loss"]
    assert first16 != first32  # autocast was on
    assert abs(first16 - first32) <= 2 * 2.0**-8 * layers * abs(first32)
    assert mixed.history[-1]["loss"] < first16  # it learns
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())
    with pytest.raises(ValueError, match=r"^amp fp16 needs a CUDA device"):
        fit(BaseRegressor(1, 1, (4, 4)), x, y, TrainConfig(steps=1, amp="fp16"))
