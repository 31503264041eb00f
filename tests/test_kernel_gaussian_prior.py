"""The kernel Gaussian prior (:class:`dwp.KernelGaussianPrior`) and the common fit report.

Every closed form is checked against ``torch.distributions`` in float64: the KL from the
mean-field posterior (summed over kernel slices, 1D/2D/3D kernels, several groups, with
and without a learned scale), its hand-written gradients, the log density; sampling and
fitting against known Gaussians with tolerances from the sample size; files, errors
naming the layer, ``init="prior"``, the empirical-Bayes scale against the optimum that
gradient descent finds, and the report's scores against hand computations.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal, kl_divergence

import dwp
from dwp.posterior import MeanFieldNormal
from dwp.priors import (
    KernelGaussianPrior,
    KernelGaussianSitePrior,
    KLKind,
    PriorFileError,
    fit_kernel_gaussian,
    fit_report,
    held_out_scores,
    load_prior,
)
from dwp.priors.report import kernel_scores, render_scores

F64 = torch.float64


def _spd(k: int, seed: int, scale: float = 0.1) -> torch.Tensor:
    """A random symmetric positive definite (k, k) covariance with kernel-like entries."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=g, dtype=F64)
    return scale**2 * (a @ a.T / k + 0.2 * torch.eye(k, dtype=F64))


def _prior(kernel_shape, groups=("a", "b"), layer_groups=None, learn_scale=False, seed=0):
    k = math.prod(kernel_shape)
    g = torch.Generator().manual_seed(seed)
    means = {name: 0.1 * torch.randn(kernel_shape, generator=g, dtype=F64) for name in groups}
    covs = {name: _spd(k, seed + i + 1) for i, name in enumerate(groups)}
    return KernelGaussianPrior(means, covs, layer_groups, learn_scale=learn_scale)


def _posterior(shape, kernel_dims, name="conv.weight", seed=1, log_sigma=(-5.0, -1.0)):
    g = torch.Generator().manual_seed(seed)
    loc = 0.1 * torch.randn(shape, generator=g, dtype=F64)
    log_scale = torch.empty(shape, dtype=F64).uniform_(*log_sigma, generator=g)
    return MeanFieldNormal(loc, log_scale, name, kernel_dims)


def _marginal(prior: KernelGaussianPrior, group: str, log_c: float = 0.0) -> MultivariateNormal:
    gaussian = prior.gaussians[group]
    return MultivariateNormal(gaussian.loc, math.exp(2 * log_c) * prior.covariance(group))


def _torch_kl(q: MeanFieldNormal, p: MultivariateNormal) -> torch.Tensor:
    k = p.event_shape[0]
    loc, var = q.loc.reshape(-1, k), q.scale.reshape(-1, k) ** 2
    return kl_divergence(MultivariateNormal(loc, torch.diag_embed(var)), p).sum()


SHAPES = [
    ((3,), (4, 2, 3)),
    ((3, 3), (5, 3, 3, 3)),
    ((3, 3, 3), (4, 3, 3, 3, 3)),
    ((2, 3), (2, 2, 2, 3)),
]


# -- 1. closed forms against torch.distributions --------------------------------------------
@pytest.mark.parametrize(("kernel_shape", "shape"), SHAPES)
def test_kl_matches_torch_for_every_group(kernel_shape, shape):
    prior = _prior(kernel_shape, layer_groups={"enc*": "a", "dec*": "b"})
    assert prior.kl_kind is KLKind.EXACT
    for layer, group in (("enc1", "a"), ("dec2", "b")):
        q = _posterior(shape, len(kernel_shape), name=f"{layer}.weight", seed=len(layer))
        site = prior.for_site(q.name, q.loc, q.kernel_dims)
        assert isinstance(site, KernelGaussianSitePrior) and site.group == group
        expected = _torch_kl(q, _marginal(prior, group))
        torch.testing.assert_close(site.kl(q), expected, rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(prior.kl(q), expected, rtol=1e-10, atol=1e-8)  # template
    # the two groups differ, so the check above tells them apart
    q = _posterior(shape, len(kernel_shape), name="enc1.weight")
    assert not torch.allclose(
        _torch_kl(q, _marginal(prior, "a")), _torch_kl(q, _marginal(prior, "b"))
    )


@pytest.mark.parametrize("log_c", [-0.7, 0.0, 0.4])
def test_kl_with_a_scale_factor_is_the_kl_to_c2_s(log_c):
    prior = _prior((3, 3), groups=("g",), learn_scale=True)
    q = _posterior((4, 2, 3, 3), 2)
    site = prior.for_site(q.name, q.loc, 2)
    assert site.log_scale_factor.item() == 0.0 and site.log_scale_factor.requires_grad
    with torch.no_grad():
        site.log_scale_factor.fill_(log_c)
    expected = _torch_kl(q, _marginal(prior, "g", log_c))
    torch.testing.assert_close(site.kl(q), expected, rtol=1e-10, atol=1e-8)
    w = torch.randn(7, 3, 3, dtype=F64)
    torch.testing.assert_close(
        site.kernel_log_prob(w), _marginal(prior, "g", log_c).log_prob(w.reshape(7, -1))
    )


def test_hand_written_gradients_check_and_match_torch():
    prior = _prior((3, 3), groups=("g",), learn_scale=True)
    q = _posterior((3, 2, 3, 3), 2)
    site = prior.for_site(q.name, q.loc, 2)
    loc, log_scale = q.loc.clone().requires_grad_(), q.log_scale.clone().requires_grad_()
    log_c = site.log_scale_factor

    def kl(loc, log_scale, log_c_value):
        with torch.no_grad():
            log_c.copy_(log_c_value)
        site.zero_grad()
        return site.kl(MeanFieldNormal(loc, log_scale, q.name, 2))

    # gradcheck of loc and log-scales (the scale factor's gradient separately below)
    assert torch.autograd.gradcheck(
        lambda a, b: kl(a, b, torch.tensor(0.3, dtype=F64)), (loc, log_scale)
    )
    value = kl(loc, log_scale, torch.tensor(0.3, dtype=F64))
    got = torch.autograd.grad(value, (loc, log_scale, log_c))
    log_c_ref = torch.tensor(0.3, dtype=F64, requires_grad=True)
    reference = _torch_kl(
        MeanFieldNormal(loc, log_scale, q.name, 2),
        MultivariateNormal(
            prior.gaussians["g"].loc, torch.exp(2 * log_c_ref) * prior.covariance("g")
        ),
    )
    expected = torch.autograd.grad(reference, (loc, log_scale, log_c_ref))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_kl_is_finite_for_tiny_posterior_scales():
    prior = _prior((3, 3), groups=("g",))
    q = _posterior((2, 2, 3, 3), 2, log_sigma=(-40.0, -39.0))
    kl = prior.kl(q)
    assert torch.isfinite(kl) and kl > 0
    torch.testing.assert_close(kl, _torch_kl(q, _marginal(prior, "g")), rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize(("kernel_shape", "shape"), SHAPES)
def test_log_prob_matches_torch(kernel_shape, shape):
    prior = _prior(kernel_shape, groups=("g",))
    site = prior.for_site("c.weight", torch.zeros(shape), len(kernel_shape))
    w = 0.2 * torch.randn(shape, dtype=F64)
    k = math.prod(kernel_shape)
    expected = _marginal(prior, "g").log_prob(w.reshape(-1, k))
    torch.testing.assert_close(site.kernel_log_prob(w.reshape(-1, *kernel_shape)), expected)
    torch.testing.assert_close(site.log_prob(w), expected.sum())


def test_sample_moments_match_the_prior():
    prior = _prior((3, 3), groups=("g",))
    n = 20_000
    torch.manual_seed(0)
    draws = prior.sample((n // 4, 4, 3, 3)).reshape(n, 9)
    mu, cov = prior.gaussians["g"].loc, prior.covariance("g")
    var = cov.diagonal()
    # standard errors: sqrt(S_ii / n) for the means, sqrt((S_ii S_jj + S_ij^2) / n) for the
    # covariance entries; 5 SE over 9 + 45 entries fails with probability ~3e-5
    assert ((draws.mean(0) - mu).abs() <= 5 * (var / n).sqrt()).all()
    se_cov = ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    assert ((torch.cov(draws.T) - cov).abs() <= 5 * se_cov).all()


# -- 2. fitting ----------------------------------------------------------------------------
def _bank(kernels_by_group: dict[str, torch.Tensor]) -> dwp.KernelBank:
    kernels = torch.cat(list(kernels_by_group.values())).float()
    groups = torch.cat([torch.full((len(k),), i) for i, k in enumerate(kernels_by_group.values())])
    names = list(kernels_by_group)
    return dwp.KernelBank(
        kernels=kernels, group=groups, source=torch.zeros(len(kernels), dtype=torch.int64),
        layer=groups.clone(), group_names=names, source_names=["net.pt"],
        layer_names=[f"layer{i}" for i in range(len(names))],
        layer_groups={f"layer{i}": g for i, g in enumerate(names)}, metadata={"group_by": "test"},
    )  # fmt: skip


def test_fit_from_a_bank_recovers_known_gaussians():
    n, truth = 20_000, {}
    torch.manual_seed(0)
    for i, name in enumerate(("g0", "g1")):
        mu, cov = 0.05 * torch.randn(9, dtype=F64), _spd(9, 10 + i)
        truth[name] = (mu, cov, MultivariateNormal(mu, cov).sample((n,)).reshape(n, 3, 3))
    bank = _bank({g: t[2] for g, t in truth.items()})
    prior = KernelGaussianPrior.fit(bank)
    assert prior.groups == ["g0", "g1"] and prior.layer_groups == bank.layer_groups
    assert prior.metadata["kernels_per_group"] == {"g0": n, "g1": n}
    assert prior.metadata["sources"] == ["net.pt"] and prior.metadata["fit"]["covariance"] == "full"
    for name, (mu, cov, _) in truth.items():
        var = cov.diagonal()
        fitted_mu = prior.gaussians[name].loc.double()
        assert ((fitted_mu - mu).abs() <= 5 * (var / n).sqrt()).all()
        se_cov = ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
        assert ((prior.covariance(name).double() - cov).abs() <= 5 * se_cov).all()
        # 20,000 kernels of 9 entries: the Ledoit-Wolf intensity is next to nothing
        assert prior.metadata["fit"]["shrinkage_intensity"][name] < 0.01
    assert prior.for_site("layer1.weight", torch.zeros(2, 2, 3, 3), 2).group == "g1"
    # the diagonal Gaussian keeps the variances only
    diagonal = KernelGaussianPrior.fit(bank, diagonal=True)
    cov = diagonal.covariance("g0")
    assert torch.equal(cov, torch.diag(cov.diagonal()))
    torch.testing.assert_close(cov.diagonal(), prior.covariance("g0").diagonal(), rtol=1e-3, atol=0)


def test_ledoit_wolf_intensity_matches_scikit_learn():
    sklearn_covariance = pytest.importorskip("sklearn.covariance")
    torch.manual_seed(0)
    x = MultivariateNormal(torch.zeros(27, dtype=F64), _spd(27, 3)).sample((60,))
    mean, cov, intensity = fit_kernel_gaussian(x.reshape(60, 3, 3, 3))
    expected_cov, expected = sklearn_covariance.ledoit_wolf(x.numpy())
    assert intensity == pytest.approx(expected, rel=1e-9)
    # ours adds the relative ridge of 1e-6 of the mean variance
    ridge = 1e-6 * torch.trace(torch.cov(x.T, correction=0)) / 27
    torch.testing.assert_close(
        cov, torch.from_numpy(expected_cov) + ridge * torch.eye(27, dtype=F64)
    )
    torch.testing.assert_close(mean, x.mean(0))


def test_shrinkage_helps_with_few_kernels():
    # 30 kernels of 27 entries: the sample covariance is nearly singular and scores
    # held-out kernels far worse than the shrunk one (measured: -175.3 vs 22.2 nats per
    # kernel at a Ledoit-Wolf intensity of 0.57; the true density gives 26.2)
    truth = MultivariateNormal(torch.zeros(27, dtype=F64), _spd(27, 4))
    torch.manual_seed(0)
    train, test = truth.sample((30,)), truth.sample((2000,))
    scores = {}
    for shrinkage in (0.0, "ledoit-wolf"):
        mean, cov, _ = fit_kernel_gaussian(train, shrinkage=shrinkage)
        scores[shrinkage] = MultivariateNormal(mean, cov).log_prob(test).mean().item()
    assert scores["ledoit-wolf"] > scores[0.0] + 10.0
    assert scores["ledoit-wolf"] < truth.log_prob(test).mean().item()
    with pytest.raises(ValueError, match="shrinkage"):
        fit_kernel_gaussian(train, shrinkage=1.5)
    with pytest.raises(ValueError, match="at least 2 kernels"):
        fit_kernel_gaussian(train[:1])


def test_bad_constructor_arguments_name_the_group():
    eye = torch.eye(9)
    with pytest.raises(ValueError, match="one mean and one covariance per group"):
        KernelGaussianPrior({"a": torch.zeros(3, 3)}, {"b": eye})
    with pytest.raises(ValueError, match=r"'a'.*\(3, 3\).*\(4, 4\)"):
        KernelGaussianPrior({"a": torch.zeros(3, 3)}, {"a": torch.eye(4)})
    with pytest.raises(ValueError, match=r"'a'.*positive definite"):
        KernelGaussianPrior({"a": torch.zeros(3, 3)}, {"a": -eye})
    with pytest.raises(ValueError, match=r"'a'.*symmetric"):
        KernelGaussianPrior({"a": torch.zeros(3, 3)}, {"a": eye + torch.triu(eye.roll(1, 1), 1)})


# -- 3. files ------------------------------------------------------------------------------
@pytest.mark.parametrize("learn_scale", [False, True])
def test_save_load_round_trip(tmp_path, learn_scale):
    prior = _prior((3, 3, 3), layer_groups={"enc*": "a", "dec1": "b"}, learn_scale=learn_scale)
    prior.metadata = {"fit": {"covariance": "full"}, "kernels_per_group": {"a": 5, "b": 6}}
    path = tmp_path / "gaussian.pt"
    prior.save(path)
    for loaded in (load_prior(path), KernelGaussianPrior.load(path)):
        assert isinstance(loaded, KernelGaussianPrior)
        assert loaded.config() == prior.config() and loaded.metadata == prior.metadata
        assert loaded.describe() == prior.describe()
        for group in prior.groups:
            assert torch.equal(loaded.gaussians[group].loc, prior.gaussians[group].loc)
            assert torch.equal(loaded.covariance(group), prior.covariance(group))
        q = _posterior((2, 2, 3, 3, 3), 3, name="dec1.weight")
        torch.testing.assert_close(loaded.kl(q), prior.kl(q))
        assert loaded.for_site(q.name, q.loc, 3).group == "b"
    assert load_prior(path, learn_scale=not learn_scale).learn_scale is not learn_scale
    with pytest.raises(PriorFileError, match="not a deep weight prior file"):
        dwp.DeepWeightPrior.load(path)


def test_a_corrupt_cholesky_factor_is_rejected_naming_the_file(tmp_path):
    path = tmp_path / "gaussian.pt"
    _prior((3, 3), groups=("g",)).save(path)
    payload = torch.load(path, weights_only=True)
    payload["state"]["gaussians.g.scale_tril"][0, 0] = -1.0
    torch.save(payload, path)
    with pytest.raises(PriorFileError, match=re.escape(str(path)) + ".*'g'.*Cholesky"):
        load_prior(path)


def test_a_prior_with_function_groups_cannot_be_saved(tmp_path):
    prior = _prior((3, 3), groups=("g",), layer_groups=lambda name: "g")
    with pytest.raises(ValueError, match="function"):
        prior.save(tmp_path / "p.pt")


# -- 4. binding to layers and its errors ------------------------------------------------------
def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            enc1=nn.Conv3d(1, 3, 3, padding=1),
            enc2=nn.Conv3d(3, 3, 3, padding=1),
            dec1=nn.Conv3d(3, 2, 3, padding=1),
            proj=nn.Conv3d(2, 2, 1),
            flat=nn.Flatten(),
            head=nn.Linear(2 * 4**3, 3),
        )
    )


LAYERS = ["enc1", "enc2", "dec1"]


@pytest.mark.parametrize(
    ("layer", "pattern"),
    [
        ("proj", r"kernel Gaussian prior for 'proj\.weight'.*\(3, 3, 3\).*\(2, 2, 1, 1, 1\)"),
        ("head", r"'head\.weight'.*\(3, 3, 3\).*dense weight has no spatial kernels"),
    ],
)
def test_a_layer_of_another_kernel_shape_is_rejected_naming_it(layer, pattern):
    prior = _prior((3, 3, 3), groups=("g",))
    with pytest.raises(dwp.PriorMismatchError, match=pattern):
        dwp.bayesianize(_net(), prior, include=[layer])
    site = prior.for_site("enc1.weight", torch.zeros(3, 1, 3, 3, 3), 3)
    wrong = MeanFieldNormal(torch.zeros(2, 2, 3, 3), torch.zeros(2, 2, 3, 3), "c2.weight", 2)
    with pytest.raises(dwp.PriorMismatchError, match=r"'c2\.weight'.*\(3, 3, 3\).*\(2, 2, 3, 3\)"):
        site.kl(wrong)


def test_a_layer_without_a_group_is_rejected_naming_it():
    prior = _prior((3, 3, 3), layer_groups={"enc*": "a"})
    with pytest.raises(
        dwp.PriorMismatchError, match=r"kernel Gaussian prior: layer 'dec1'.*\['a', 'b'\]"
    ):
        dwp.bayesianize(_net(), prior, include=LAYERS)
    with pytest.raises(ValueError, match="for_site"):
        prior.sample((2, 1, 3, 3, 3))  # two groups: which one?


def test_a_checkpoint_fitted_for_other_groups_is_rejected_naming_the_layer():
    def build(layer_groups):
        return dwp.bayesianize(_net(), _prior((3, 3, 3), layer_groups=layer_groups), include=LAYERS)

    saved = build({"enc1": "a", "enc2": "b", "dec1": "b"}).state_dict()
    with pytest.raises(RuntimeError, match=r"enc2\.weight_prior.*group"):
        build({"*": "a"}).load_state_dict(saved)
    normal = dwp.bayesianize(_net(), dwp.NormalPrior(), include=LAYERS)
    with pytest.raises(RuntimeError, match=r"enc1\.weight_prior.*NormalPrior"):
        build({"*": "a"}).load_state_dict(normal.state_dict(), strict=False)


def test_bayesianize_with_init_prior_draws_typical_kernels():
    prior = _prior((3, 3, 3), layer_groups={"enc*": "a", "dec*": "b"})
    torch.manual_seed(1)
    net = dwp.bayesianize(_net(), prior, include=LAYERS, init="prior")
    # E[log p(w)] under p is -0.5 (k log 2 pi + log|S| + k); its spread over one kernel is
    # sqrt(k / 2) = 3.7 nats, so a layer of 3-9 kernels lies within 4 sqrt(k/2) of it
    for name, group in (("enc1", "a"), ("enc2", "a"), ("dec1", "b")):
        weight = getattr(net, name).weight.detach().double()
        p = _marginal(prior, group)
        scores = p.log_prob(weight.reshape(-1, 27))
        assert abs(scores.mean().item() + p.entropy().item()) < 4 * math.sqrt(27 / 2)
    assert all(isinstance(getattr(net, n).weight_prior, KernelGaussianSitePrior) for n in LAYERS)
    assert net.enc1.weight_prior.gaussian is net.enc2.weight_prior.gaussian  # one per group
    kl = dwp.kl(net)
    expected = sum(
        _torch_kl(getattr(net, n).weight_posterior, _marginal(prior, g))
        for n, g in (("enc1", "a"), ("enc2", "a"), ("dec1", "b"))
    )
    torch.testing.assert_close(kl.double(), expected.double(), rtol=1e-5, atol=1e-3)


# -- 5. empirical Bayes: the learned scale ---------------------------------------------------
def test_closed_form_log_scale_is_the_optimum_gradient_descent_finds():
    prior = _prior((3, 3, 3), layer_groups={"enc*": "a", "dec*": "b"}, learn_scale=True)
    net = dwp.bayesianize(_net(), prior, include=LAYERS, init_log_sigma=-3.0)
    factors = {n: getattr(net, n).weight_prior.log_scale_factor for n in LAYERS}
    names = {name for name, _ in net.named_parameters()}
    assert {f"{n}.weight_prior.log_scale_factor" for n in LAYERS} <= names
    closed = {
        n: prior.closed_form_log_scale(getattr(net, n).weight_posterior).item() for n in LAYERS
    }
    # the posterior is held fixed; only the scale factors learn, from the KL's gradient
    optimiser = torch.optim.Adam(factors.values(), lr=0.05)
    for _ in range(600):
        optimiser.zero_grad()
        dwp.kl(net).backward()
        optimiser.step()
    for name in LAYERS:
        assert factors[name].item() == pytest.approx(closed[name], abs=1e-3)
        site = getattr(net, name).weight_prior
        assert site.closed_form_log_scale(
            getattr(net, name).weight_posterior
        ).item() == pytest.approx(closed[name])
    # at the optimum the KL's derivative in each factor is 0
    net.zero_grad()
    dwp.kl(net).backward()
    assert all(abs(f.grad.item()) < 1e-2 for f in factors.values())


# -- 6. the common fit report ----------------------------------------------------------------
def test_report_scores_equal_hand_computations_for_gaussians():
    full = _prior((3, 3), groups=("a", "b"))
    diagonal = KernelGaussianPrior(
        {g: full.gaussians[g].loc.reshape(3, 3) for g in full.groups},
        {g: torch.diag(full.covariance(g).diagonal()) for g in full.groups},
    )
    g = torch.Generator().manual_seed(5)
    test = {"a": 0.1 * torch.randn(40, 3, 3, generator=g, dtype=F64),
            "b": 0.1 * torch.randn(25, 3, 3, generator=g, dtype=F64)}  # fmt: skip
    scores = held_out_scores({"full": full, "diag": diagonal}, test, reference="full")
    assert scores["unit"] == "nats per kernel" and scores["how"] == {
        "full": "exact",
        "diag": "exact",
    }
    everything = {"full": [], "diag": []}
    for group, kernels in test.items():
        hand = {
            "full": _marginal(full, group).log_prob(kernels.reshape(-1, 9)),
            "diag": torch.distributions.Normal(
                full.gaussians[group].loc, full.covariance(group).diagonal().sqrt()
            )
            .log_prob(kernels.reshape(-1, 9))
            .sum(1),
        }
        entry = scores["groups"][group]
        assert entry["kernels"] == len(kernels)
        for name, values in hand.items():
            everything[name].append(values)
            assert entry["scores"][name]["mean"] == pytest.approx(values.mean().item(), rel=1e-12)
            assert entry["scores"][name]["se"] == pytest.approx(
                values.std().item() / math.sqrt(len(values)), rel=1e-9
            )
            torch.testing.assert_close(
                kernel_scores(full if name == "full" else diagonal, group, kernels), values
            )
        difference = hand["diag"] - hand["full"]
        assert entry["differences"]["diag"]["mean"] == pytest.approx(difference.mean().item())
        assert entry["differences"]["diag"]["se"] == pytest.approx(
            difference.std().item() / math.sqrt(len(difference))
        )
    overall = torch.cat(everything["full"])
    assert scores["overall"]["kernels"] == 65
    assert scores["overall"]["scores"]["full"]["mean"] == pytest.approx(overall.mean().item())

    table = fit_report({"full": full, "diag": diagonal}, test, reference="full")
    assert table == render_scores(scores)
    lines = table.splitlines()
    assert (
        "full, exact (nats/kernel)" in lines[0] and "diag − full (nats/kernel, paired)" in lines[0]
    )
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["a", "b", "all groups"]
    first = scores["groups"]["a"]["scores"]["full"]
    assert f"{first['mean']:.3f} ± {first['se']:.3f}" in lines[2]
    with pytest.raises(ValueError, match="reference 'other'"):
        held_out_scores({"full": full}, test, reference="other")
    with pytest.raises(TypeError, match="NormalPrior"):
        kernel_scores(dwp.NormalPrior(), "a", test["a"])
