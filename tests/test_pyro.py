"""Pyro interop: the library's ELBO equals Pyro's TraceMeanField_ELBO for the same parameters;
priors as Pyro distributions with registered KLs."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from torch import nn
from torch.distributions import kl_divergence

import dwp
from dwp.likelihoods import gaussian_nll
from dwp.posterior import MeanFieldNormal
from dwp.pyro import PriorDistribution, PyroBNN, prior_distribution


def _net(prior=None, bayesian_bias=False):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    return dwp.bayesianize(plain, prior, init_log_sigma=-2.0, bayesian_bias=bayesian_bias)


@pytest.mark.parametrize(
    ("prior", "bayesian_bias"),
    [(dwp.NormalPrior(), False), (dwp.NormalPrior(0.1, 0.5), True), (dwp.LogUniformPrior(), False)],
)
def test_library_loss_equals_pyro_trace_mean_field_elbo(prior, bayesian_bias):
    # Same parameters, same weight sample (same seed, same sampling order): the two losses
    # must be equal.  With the log-uniform prior this holds only if Pyro used the registered
    # KL (its log_prob is improper and a sampled KL would differ).
    net = _net(prior, bayesian_bias)
    x, y, n_data, noise = torch.randn(5, 3), torch.randn(5, 1), 20, 0.5
    bnn = PyroBNN(net, lambda out: dist.Normal(out, noise), n_data=n_data)
    pyro.clear_param_store()
    torch.manual_seed(1)
    pyro_loss = TraceMeanField_ELBO().loss(bnn.model, bnn.guide, x, y)
    torch.manual_seed(1)
    net.train()
    nll = gaussian_nll(net(x), y, noise)
    ours = dwp.elbo(nll, net, n_data=n_data, batch_size=len(x)).loss.item()
    assert ours == pytest.approx(pyro_loss, rel=1e-5)


def test_svi_trains_the_dwp_network_parameters():
    net = _net()
    x = torch.randn(32, 3)
    y = x[:, :1] * 2.0
    bnn = PyroBNN(net, lambda out: dist.Normal(out, 0.1), n_data=32)
    pyro.clear_param_store()
    before = net[0].weight.detach().clone()
    svi = SVI(bnn.model, bnn.guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    torch.manual_seed(0)
    losses = [svi.step(x, y) for _ in range(150)]
    assert not torch.equal(before, net[0].weight)  # pyro.module registered the same tensors
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


def test_prior_distribution_for_gaussian_priors_is_native():
    w = torch.randn(4, 2, 3, 3)
    d = prior_distribution(dwp.NormalPrior(0.0, 2.0), w, "conv.weight", kernel_dims=2)
    assert d.event_shape == w.shape and d.batch_shape == ()
    torch.testing.assert_close(
        d.log_prob(w), torch.distributions.Normal(0.0, 2.0).log_prob(w).sum()
    )
    moped = prior_distribution(dwp.PretrainedNormalPrior(scale_factor=0.1), w, "conv.weight", 2)
    torch.testing.assert_close(moped.base_dist.loc, w)  # the template bound to this weight


def test_registered_kl_and_lower_bound_log_prob():
    prior = dwp.LogUniformPrior()
    w = torch.randn(3, 4)
    p = prior_distribution(prior, w, "fc.weight")
    assert isinstance(p, PriorDistribution)
    q = dist.Normal(w, 0.1 * torch.ones_like(w)).to_event(2)
    expected = prior.kl(MeanFieldNormal(w, torch.full_like(w, 0.1).log()))
    torch.testing.assert_close(kl_divergence(q, p), expected)
    batch = torch.randn(2, 5, 3, 4)
    lp = p.log_prob(batch)
    assert lp.shape == (2, 5)
    torch.testing.assert_close(lp[1, 2], prior.log_prob(batch[1, 2]))


def test_prior_mismatch_is_reported_through_pyro():
    template = dwp.PretrainedNormalPrior(torch.randn(3, 3))
    with pytest.raises(dwp.PriorMismatchError, match=r"head\.weight"):
        prior_distribution(template, torch.randn(4, 3), "head.weight")


def test_trace_elbo_uses_the_prior_log_prob():
    # With Trace_ELBO (no analytic KL) the model's log_prob is used: finite, differentiable.
    net = _net()
    bnn = PyroBNN(net, lambda out: dist.Normal(out, 1.0), n_data=10)
    pyro.clear_param_store()
    loss = Trace_ELBO().differentiable_loss(
        bnn.model, bnn.guide, torch.randn(4, 3), torch.randn(4, 1)
    )
    loss.backward()
    assert torch.isfinite(loss) and net[0].weight_log_sigma.grad is not None


def test_pyro_bnn_needs_bayesian_layers():
    with pytest.raises(ValueError, match="bayesianize"):
        PyroBNN(nn.Linear(2, 1), lambda out: dist.Normal(out, 1.0))
