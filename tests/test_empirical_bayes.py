"""Empirical Bayes for the prior's strength (dwp.empirical_bayes_, dwp.prior_scales): the
closed form against the optimum the ELBO's gradient reaches, the exact KL with a learned
factor, per-site factors, pooling over shared priors, files and optimisers."""

import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

import dwp
from dwp.priors import NormalPrior, PretrainedNormalPrior


def _layer(prior, seed=0, dtype=torch.float64):
    """A BayesLinear(64, 32) in ``dtype`` (its prior's factor too) with a random posterior."""
    torch.manual_seed(seed)
    layer = dwp.bayesianize(nn.Linear(64, 32), prior, init_log_sigma=-2.0).to(dtype)
    with torch.no_grad():
        layer.weight.add_(0.1 * torch.randn_like(layer.weight))
        layer.weight_log_sigma.uniform_(-4.0, -2.0)
    return layer


PRIORS = {
    "normal": lambda: NormalPrior(0.1, 0.5, learn_scale=True),
    "pretrained": lambda: PretrainedNormalPrior(scale_factor=0.2, learn_scale=True),
}


@pytest.mark.parametrize("make", PRIORS.values(), ids=PRIORS.keys())
def test_the_closed_form_is_the_optimum_the_elbo_gradient_reaches(make):
    layer = _layer(make())
    prior = layer.weight_prior
    for p in (layer.weight, layer.weight_log_sigma, layer.bias):
        p.requires_grad_(False)  # a fixed posterior: only the factor moves
    closed = prior.closed_form_log_scale(layer.weight_posterior).item()
    with torch.no_grad():  # start above the optimum, where the curvature is at most 2
        prior.log_scale_factor.fill_(closed + 3.0)
    n = layer.weight.numel()
    x = torch.randn(8, 64, dtype=torch.float64)
    optimizer = torch.optim.SGD([prior.log_scale_factor], lr=0.25)
    for _ in range(300):
        optimizer.zero_grad()
        nll = layer.eval()(x).pow(2).sum()  # a data term: it does not depend on the factor
        terms = dwp.elbo(nll, layer, n_data=80, batch_size=8)
        (terms.loss / n).backward()
        optimizer.step()
    # The negative ELBO over n is t + (c*^2 e^{-2t}) / 2 + const in t = log c: convex,
    # with curvature at most 2 above the optimum t*, where gradient descent with lr 0.25
    # (< 1/2) starts and stays.  Steps are at most 0.25 long, and the error halves each
    # step near t*: after 300 steps (about 20 spent getting near t* from t* + 3) it is far
    # below float64 rounding of the n-term sums (~1e-13); 1e-9 is room for that alone.
    assert prior.log_scale_factor.item() == pytest.approx(closed, abs=1e-9)
    assert abs(closed) > 0.3  # an informative setting: the optimum is not the factor 1
    grad = torch.autograd.grad(layer.kl(), prior.log_scale_factor, allow_unused=False)[0]
    assert grad.abs().item() < 1e-6 * n  # the KL is stationary there


@pytest.mark.parametrize("make", PRIORS.values(), ids=PRIORS.keys())
def test_the_kl_stays_exact_with_a_factor(make):
    layer = _layer(make(), dtype=torch.float32)
    prior = layer.weight_prior
    with torch.no_grad():
        prior.log_scale_factor.fill_(0.7)
    q = layer.weight_posterior
    base = prior.scale
    expected = kl_divergence(Normal(q.loc, q.scale), Normal(prior.loc, base * math.exp(0.7))).sum()
    torch.testing.assert_close(layer.kl(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(prior.stddev, base * math.exp(0.7) * torch.ones_like(base))
    value = torch.randn(32, 64)
    expected_log_prob = Normal(prior.loc, base * math.exp(0.7)).log_prob(value).sum()
    torch.testing.assert_close(prior.log_prob(value), expected_log_prob, rtol=1e-5, atol=1e-3)


def test_without_learn_scale_nothing_changes():
    prior = NormalPrior(0.0, 0.5)
    assert prior.log_scale_factor is None and not list(prior.parameters())
    assert "log_scale_factor" not in prior.state_dict() and torch.equal(prior.stddev, prior.scale)
    model = dwp.bayesianize(nn.Linear(3, 2), prior)
    assert dwp.prior_scales(model) == {}
    assert dwp.empirical_bayes_(model) is model


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))


def test_every_site_gets_its_own_factor_and_empirical_bayes_sets_and_reports_it():
    template = NormalPrior(learn_scale=True)
    model = dwp.bayesianize(
        _net(), template, bayesian_bias=True, bias_prior=NormalPrior(learn_scale=True)
    )
    factors = {n: p for n, p in model.named_parameters() if n.endswith("log_scale_factor")}
    assert set(factors) == {
        "0.weight_prior.log_scale_factor",
        "0.bias_prior.log_scale_factor",
        "3.weight_prior.log_scale_factor",
        "3.bias_prior.log_scale_factor",
    }
    assert template.log_scale_factor.item() == 0.0  # the template is never trained
    assert dwp.prior_scales(model) == {
        "0.weight": 1.0,
        "0.bias": 1.0,
        "3.weight": 1.0,
        "3.bias": 1.0,
    }
    before = dwp.kl(model).item()
    assert dwp.empirical_bayes_(model) is model
    scales = dwp.prior_scales(model)
    for name, layer in dwp.bayesian_layers(model):
        for prior, posterior in layer.sites():
            kind = posterior.name.rpartition(".")[2]
            closed = prior.closed_form_log_scale(posterior).item()
            assert scales[f"{name}.{kind}"] == pytest.approx(math.exp(closed), rel=1e-6)
    # N(0, 1) is far too wide for torch's initialisation: every factor is well below 1
    assert all(c < 0.7 for c in scales.values()), scales
    assert dwp.kl(model).item() < before
    # at the optimum the KL's gradient on every factor vanishes
    grads = torch.autograd.grad(dwp.kl(model), list(factors.values()))
    assert all(g.abs().item() < 1e-3 for g in grads)


def test_a_prior_shared_by_several_sites_gets_the_pooled_optimum():
    model = dwp.bayesianize(_net(), NormalPrior(learn_scale=True))
    shared = model[0].weight_prior
    model[3].weight_prior = shared  # one factor for both layers (a group's template)
    dwp.empirical_bayes_(model)
    posteriors = [model[0].weight_posterior, model[3].weight_posterior]
    m = torch.cat([p.loc.detach().flatten() for p in posteriors])
    s = torch.cat([p.scale.detach().flatten() for p in posteriors])
    pooled = NormalPrior().closed_form_log_scale(dwp.MeanFieldNormal(m, s.log()))
    torch.testing.assert_close(shared.log_scale_factor.detach(), pooled, rtol=1e-5, atol=1e-6)
    assert dwp.prior_scales(model)["0.weight"] == dwp.prior_scales(model)["3.weight"]


def test_a_frozen_factor_is_left_alone():
    model = dwp.bayesianize(_net(), NormalPrior(learn_scale=True))
    model[0].weight_prior.log_scale_factor.requires_grad_(False)
    dwp.empirical_bayes_(model)
    scales = dwp.prior_scales(model)
    assert scales["0.weight"] == 1.0 and scales["3.weight"] != 1.0


def test_the_optimisers_train_the_factor():
    model = dwp.bayesianize(_net(), NormalPrior(learn_scale=True))
    optimizer = dwp.optim.build_optimizer("natural", model, 1e-2, kl_weight=1.0)
    natural = {id(p) for p in optimizer.scale_parameters()}
    factor = model[3].weight_prior.log_scale_factor
    assert id(factor) not in natural  # trained by Adam, with the means
    x = torch.randn(4, 2, 4, 4)
    loss = dwp.elbo(model(x).pow(2).sum(), model, n_data=4, batch_size=4).loss
    loss.backward()
    optimizer.step()
    assert factor.item() < 0  # the KL pulls an N(0, 1) prior towards the small weights


def test_learned_factors_travel_in_checkpoints_and_prior_files(tmp_path):
    model = dwp.bayesianize(_net(), PretrainedNormalPrior(learn_scale=True))
    dwp.empirical_bayes_(model)
    again = dwp.bayesianize(_net(), PretrainedNormalPrior(learn_scale=True))
    again.load_state_dict(model.state_dict())
    assert dwp.prior_scales(again) == dwp.prior_scales(model)
    site = model[0].weight_prior
    site.save(tmp_path / "site.pt")
    loaded = dwp.priors.load_prior(tmp_path / "site.pt")
    assert loaded.learn_scale and loaded.config() == site.config()
    assert torch.equal(loaded.log_scale_factor, site.log_scale_factor)
