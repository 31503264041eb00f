"""Priors: closed-form KLs against torch.distributions, summing, binding to sites, errors."""

import itertools
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import dwp
from dwp.posterior import MeanFieldNormal
from dwp.priors import (
    KLKind,
    LogUniformPrior,
    NormalPrior,
    PretrainedNormalPrior,
    PriorMismatchError,
)
from dwp.swag import SWAGMomentsError


def _posterior(shape, seed=0, name="layer.weight"):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(shape, generator=g)
    log_scale = torch.empty(shape).uniform_(-4, 0.5, generator=g)
    return MeanFieldNormal(loc, log_scale, name)


@pytest.mark.parametrize(("loc", "scale"), [(0.0, 1.0), (0.3, 0.1), (-1.0, 2.5)])
def test_normal_kl_matches_torch_and_is_summed(loc, scale):
    q = _posterior((4, 3, 3, 3))
    expected = kl_divergence(Normal(q.loc, q.scale), Normal(loc, scale)).sum()
    got = NormalPrior(loc, scale).kl(q)
    assert got.dim() == 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_kl_grows_with_the_number_of_weights():
    # bayesian-torch averaged each layer's KL, so a 1024x larger layer had the same KL.
    small = _posterior((2, 3))
    big = MeanFieldNormal(small.loc.repeat(1024, 1), small.log_scale.repeat(1024, 1))
    prior = NormalPrior()
    torch.testing.assert_close(prior.kl(big), 1024 * prior.kl(small), rtol=1e-5, atol=0)


def test_normal_kl_is_finite_for_tiny_scales():
    q = MeanFieldNormal(torch.zeros(3), torch.full((3,), -60.0))  # sigma ~ 1e-26
    kl = NormalPrior().kl(q)
    assert torch.isfinite(kl)
    torch.testing.assert_close(kl, torch.tensor(3 * (60.0 - 0.5)), rtol=1e-6, atol=1e-4)


def test_normal_log_prob_and_sample():
    prior = NormalPrior(0.5, 2.0)
    w = torch.randn(10)
    torch.testing.assert_close(prior.log_prob(w), Normal(0.5, 2.0).log_prob(w).sum())
    torch.manual_seed(0)
    draws = prior.sample((20000,))
    # standard errors: 2/sqrt(n) = 0.014 for the mean, 2*sqrt(2/n) = 0.02 for the std
    assert abs(draws.mean().item() - 0.5) < 5 * 0.014
    assert abs(draws.std().item() - 2.0) < 5 * 0.02


@pytest.mark.parametrize(("loc", "scale"), [(0.0, 0.0), (0.0, -1.0), (math.nan, 1.0)])
def test_normal_prior_rejects_bad_parameters(loc, scale):
    with pytest.raises(ValueError, match="NormalPrior"):
        NormalPrior(loc, scale)


def test_pretrained_prior_is_moped_gaussian():
    w0 = torch.randn(6, 2, 3)
    prior = PretrainedNormalPrior(w0, scale_factor=0.2, min_scale=1e-2)
    q = _posterior(w0.shape)
    expected = kl_divergence(Normal(q.loc, q.scale), Normal(w0, 0.2 * w0.abs() + 1e-2)).sum()
    torch.testing.assert_close(prior.kl(q), expected, rtol=1e-5, atol=1e-5)
    # KL(p || p) = 0
    same = MeanFieldNormal(w0.clone(), prior.scale.log())
    torch.testing.assert_close(prior.kl(same), torch.tensor(0.0), atol=1e-4, rtol=0)


def test_pretrained_template_binds_to_site_and_checks_shapes():
    template = PretrainedNormalPrior(scale_factor=0.1)
    with pytest.raises(RuntimeError, match="template"):
        template.kl(_posterior((2, 2)))
    w = torch.randn(3, 4)
    bound = template.for_site("encoder.fc.weight", w, 0)
    torch.testing.assert_close(bound.loc, w)
    assert bound is not template and template.loc is None
    with pytest.raises(PriorMismatchError, match=r"encoder\.fc\.weight.*\(3, 4\).*\(4, 4\)"):
        bound.for_site("encoder.fc.weight", torch.randn(4, 4), 0)
    with pytest.raises(PriorMismatchError, match=r"decoder\.weight"):
        bound.kl(_posterior((4, 4), name="decoder.weight"))


def test_pretrained_prior_state_dict_round_trip():
    prior = PretrainedNormalPrior(torch.randn(5), scale_factor=0.3)
    template = PretrainedNormalPrior(scale_factor=0.3)
    template.load_state_dict(prior.state_dict())
    torch.testing.assert_close(template.loc, prior.loc)


def _true_log_uniform_kl(log_alpha: float, n: int = 2_000_000) -> float:
    """KL(N(mu, alpha mu^2) || LogUniform) up to the constant that makes it 0 as alpha -> inf:
    -0.5 log alpha + E log|1 + sqrt(alpha) xi| - E log|xi|, with E log|xi| = -(gamma + log 2)/2.
    """
    g = torch.Generator().manual_seed(0)
    xi = torch.randn(n, generator=g, dtype=torch.float64)
    alpha = math.exp(log_alpha)
    e_log = torch.log((1 + math.sqrt(alpha) * xi).abs()).mean().item()
    e_log_xi = -(0.5772156649 + math.log(2)) / 2
    return -0.5 * log_alpha + e_log - e_log_xi


@pytest.mark.parametrize("log_alpha", [-4.0, -1.0, 0.0, 1.0, 3.0])
def test_log_uniform_kl_matches_the_integral(log_alpha):
    mu = torch.tensor([0.7])
    log_sigma = 0.5 * (log_alpha + 2 * torch.log(mu))
    got = LogUniformPrior().kl(MeanFieldNormal(mu, log_sigma)).item()
    # Molchanov et al. report a fit within ~0.01 nats; MC error of the reference ~1e-3.
    assert got == pytest.approx(_true_log_uniform_kl(log_alpha), abs=0.02)


def test_log_uniform_kl_decreases_in_alpha_and_is_summed():
    mu = torch.ones(50)
    log_alphas = torch.linspace(-6, 6, 50)
    prior = LogUniformPrior()
    per_weight = [
        prior.kl(MeanFieldNormal(mu[:1], 0.5 * la.reshape(1))).item() for la in log_alphas
    ]
    assert all(a > b for a, b in itertools.pairwise(per_weight))
    total = prior.kl(MeanFieldNormal(mu, 0.5 * log_alphas))
    assert total.item() == pytest.approx(sum(per_weight), rel=1e-5)


def test_kl_kinds_are_declared():
    assert NormalPrior().is_exact and not NormalPrior().is_bound
    assert PretrainedNormalPrior().kl_kind is KLKind.EXACT
    assert LogUniformPrior().kl_kind is KLKind.APPROXIMATION and not LogUniformPrior().is_bound


def test_priors_are_exported():
    assert dwp.NormalPrior is NormalPrior and dwp.priors.LogUniformPrior is LogUniformPrior


# -- files: every prior saves to and loads from one validated file ---------------------------
def _with_factor(prior):
    """A prior whose empirical-Bayes factor has been learned (is not its initial 1)."""
    with torch.no_grad():
        prior.log_scale_factor.fill_(-0.8)
    return prior


@pytest.mark.parametrize(
    "make",
    [
        lambda: NormalPrior(0.1, 0.5),
        lambda: PretrainedNormalPrior(torch.randn(3, 2, 3), scale_factor=0.2),
        lambda: PretrainedNormalPrior(),  # a template, without its centre
        lambda: LogUniformPrior(max_log_alpha=6.0),
        lambda: _with_factor(NormalPrior(0.0, 0.3, learn_scale=True)),
        lambda: _with_factor(PretrainedNormalPrior(torch.randn(3, 2, 3), learn_scale=True)),
    ],
    ids=[
        "normal",
        "pretrained",
        "pretrained-template",
        "log_uniform",
        "normal-eb",
        "pretrained-eb",
    ],
)
def test_prior_files_round_trip(tmp_path, make):
    prior = make()
    path = tmp_path / "prior.pt"
    prior.save(path)
    loaded = dwp.priors.load_prior(path)
    assert type(loaded) is type(prior) and loaded.config() == prior.config()
    for key, value in prior.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded.state_dict()[key], value), key
    assert type(prior).load(path).describe() == prior.describe()
    with pytest.raises(dwp.PriorFileError, match=r"prior\.pt: holds a"):
        (NormalPrior if not isinstance(prior, NormalPrior) else LogUniformPrior).load(path)


def test_prior_files_reject_unknown_kinds_and_bad_configs(tmp_path):
    path = tmp_path / "p.pt"
    NormalPrior().save(path)
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "kind": "MysteryPrior"}, tmp_path / "kind.pt")
    with pytest.raises(dwp.PriorFileError, match=r"kind\.pt: prior kind 'MysteryPrior'"):
        dwp.priors.load_prior(tmp_path / "kind.pt")
    torch.save({**payload, "config": {"loc": 0.0, "scale": -1.0}}, tmp_path / "config.pt")
    with pytest.raises(dwp.PriorFileError, match=r"config\.pt: invalid NormalPrior"):
        dwp.priors.load_prior(tmp_path / "config.pt")
    torch.save({**payload, "format_version": 9}, tmp_path / "newer.pt")
    with pytest.raises(dwp.PriorFileError, match="version 9 is not readable"):
        dwp.priors.load_prior(tmp_path / "newer.pt")


def test_load_prior_reads_a_deep_weight_prior_file(tmp_path):
    prior = dwp.DeepWeightPrior({"all": dwp.KernelVAE((3, 3))})
    prior.save(tmp_path / "dwp.pt")
    loaded = dwp.priors.load_prior(tmp_path / "dwp.pt", n_samples=2)
    assert isinstance(loaded, dwp.DeepWeightPrior) and loaded.n_samples == 2


def test_load_prior_reads_a_file_of_its_own_format_once(tmp_path, monkeypatch):
    """A format with its own loader (the deep weight prior's, SWAG moments) gets the
    contents load_prior read, not the path to read again (a moments file is MBs)."""
    dwp.DeepWeightPrior({"all": dwp.KernelVAE((3, 3))}).save(tmp_path / "dwp.pt")
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    moments = dwp.SWAGMoments.for_model(net, rank=1)
    for _ in range(3):
        with torch.no_grad():
            net[0].weight.add_(torch.randn(2, 3))
        moments.update(net)
    moments.save(tmp_path / "swag.pt")
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(1) or real_load(*a, **k))
    assert isinstance(dwp.priors.load_prior(tmp_path / "dwp.pt"), dwp.DeepWeightPrior)
    assert isinstance(dwp.priors.load_prior(tmp_path / "swag.pt"), dwp.SWAGPrior)
    assert len(reads) == 2
    # the format's own check still runs on the contents, naming the file
    payload = real_load(tmp_path / "swag.pt", weights_only=True)
    torch.save({**payload, "format_version": 99}, tmp_path / "newer.pt")
    with pytest.raises(SWAGMomentsError, match=r"newer\.pt: .*version 99"):
        dwp.priors.load_prior(tmp_path / "newer.pt")
