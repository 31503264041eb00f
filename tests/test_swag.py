"""dwp.swag / dwp.priors.swag: SWA moments and the source-trajectory (SWAG) prior."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import LowRankMultivariateNormal, MultivariateNormal, kl_divergence

import dwp
from dwp.posterior import MeanFieldNormal
from dwp.priors import SWAGSitePrior, load_prior
from dwp.priors.weight_report import render_weight_scores, weight_scores
from dwp.swag import SWAG_FILE, SWAGMomentsError


def _net(outputs: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, outputs)
    ).double()


def _walk(net: nn.Module, steps: int, moments: dwp.SWAGMoments | None = None, seed: int = 1):
    """A random trajectory of ``net``'s parameters; returns each step's weights by layer."""
    g = torch.Generator().manual_seed(seed)
    recorded = []
    for _ in range(steps):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        if moments is not None:
            moments.update(net)
        recorded.append(
            {k: net.get_submodule(k).weight.detach().numpy().copy() for k in ("0", "3")}
        )
    return recorded


def _moments(rank: int = 3, steps: int = 7) -> tuple[nn.Module, dwp.SWAGMoments]:
    net = _net()
    moments = dwp.SWAGMoments.for_model(net, rank)
    _walk(net, steps, moments)
    return net, moments


# ---------------------------------------------------------------------------------------------
# Moments


@pytest.mark.parametrize(("rank", "steps"), [(3, 7), (3, 2), (0, 4), (4, 4)])
def test_moments_match_a_direct_numpy_computation(rank: int, steps: int) -> None:
    net = _net()
    moments = dwp.SWAGMoments.for_model(net, rank)
    trajectory = _walk(net, steps, moments)
    assert moments.n_snapshots == steps and list(moments.layers) == ["0", "3"]
    for name in ("0", "3"):
        w = np.stack([step[name] for step in trajectory])  # (n, *shape)
        np.testing.assert_allclose(moments.mean(name).numpy(), w.mean(0), rtol=1e-12, atol=1e-14)
        variance = np.maximum((w**2).mean(0) - w.mean(0) ** 2, moments.variance_floor)
        np.testing.assert_allclose(moments.variance(name).numpy(), variance, rtol=1e-9)
        # columns w_i - mean_i (mean after snapshot i) of the last min(n, rank) snapshots
        running = np.cumsum(w, 0) / np.arange(1, steps + 1).reshape(-1, *[1] * (w.ndim - 1))
        expected = (w - running)[steps - min(steps, rank) :]
        got = moments.deviations(name)
        assert got.shape == (min(steps, rank), *w.shape[1:]) and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_the_variance_is_floored_where_weights_never_moved() -> None:
    net = _net()
    moments = dwp.SWAGMoments.for_model(net, 2, variance_floor=1e-9)
    for _ in range(3):
        moments.update(net)
    assert torch.all(moments.variance("3") == 1e-9)
    assert torch.all(moments.deviations("3") == 0)


def test_layers_are_chosen_by_name_or_type() -> None:
    net = _net()
    assert list(dwp.SWAGMoments.for_model(net, include=nn.Linear).layers) == ["3"]
    assert list(dwp.SWAGMoments.for_model(net, exclude="3").layers) == ["0"]
    assert dwp.SWAGMoments.for_model(net).layers["0"] == net[0].weight.shape
    with pytest.raises(ValueError, match=r"include patterns \['enc\*'\] match no"):
        dwp.SWAGMoments.for_model(net, include="enc*")
    # a Bayesian layer contributes its posterior mean
    bayes = dwp.bayesianize(net)
    moments = dwp.SWAGMoments.for_model(bayes, 1)
    moments.update(bayes)
    assert torch.equal(moments.mean("3"), bayes[3].weight.detach())


def test_a_network_of_other_layers_is_rejected_naming_the_layer() -> None:
    _, moments = _moments()
    with pytest.raises(ValueError, match=r"layer '3' has a weight of shape \(5, 48\)"):
        moments.update(_net(outputs=5))
    with pytest.raises(ValueError, match=r"no layer '3'"):
        moments.update(_net()[:2])
    assert moments.n_snapshots == 7  # nothing was added


def test_a_resumed_collection_continues_bit_for_bit(tmp_path: Path) -> None:
    net, full = _moments(steps=4)
    resumed = dwp.SWAGMoments.for_model(net, 3)
    resumed.load_state_dict(full.state_dict())
    full.save(tmp_path / "swag.pt")
    from_file = dwp.SWAGMoments.load(tmp_path / "swag.pt")
    for moments in (full, resumed, from_file):  # the same further steps (the ring wraps)
        _walk(_net(), 3, moments, seed=5)
    reference = full.state_dict()
    for other in (resumed, from_file):
        state = other.state_dict()
        assert state["n_snapshots"] == 7
        for key in ("mean", "sq_mean", "deviations"):
            for name, value in reference[key].items():
                assert torch.equal(value, state[key][name]), (key, name)


def test_state_of_another_setup_is_refused() -> None:
    net, moments = _moments(rank=3)
    other = dwp.SWAGMoments.for_model(net, 2)
    with pytest.raises(ValueError, match=r"another set-up \(rank: 3 here 2\)"):
        other.load_state_dict(moments.state_dict())
    state = moments.state_dict()
    state["mean"] = {**state["mean"], "3": torch.zeros(5)}
    with pytest.raises(ValueError, match=r"mean of layer '3' is \(5,\)"):
        dwp.SWAGMoments.for_model(net, 3).load_state_dict(state)


def test_moments_files_are_checked_naming_the_file(tmp_path: Path) -> None:
    _, moments = _moments()
    moments.save(tmp_path / "swag.pt")
    payload = torch.load(tmp_path / "swag.pt", weights_only=True)
    assert payload["format"] == SWAG_FILE.tag and payload["n_snapshots"] == 7
    torch.save({**payload, "format_version": SWAG_FILE.version + 1}, tmp_path / "newer.pt")
    with pytest.raises(SWAGMomentsError, match=r"newer\.pt: .*version .*upgrade"):
        dwp.SWAGMoments.load(tmp_path / "newer.pt")
    torch.save({**payload, "rank": 2}, tmp_path / "bad.pt")
    with pytest.raises(SWAGMomentsError, match=r"bad\.pt: inconsistent SWAG moments"):
        dwp.SWAGMoments.load(tmp_path / "bad.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(SWAGMomentsError, match=r"foreign\.pt: not a SWAG moments file"):
        dwp.SWAGMoments.load(tmp_path / "foreign.pt")


# ---------------------------------------------------------------------------------------------
# The prior's maths against torch.distributions


def _site(rank: int, shape=(3, 4), scale: float = 0.7, seed: int = 0, learn: float | None = None):
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    prior = SWAGSitePrior("layer.weight", shape, rank, scale=scale, learn_scale=learn is not None)
    prior.double()
    with torch.no_grad():
        prior.loc.copy_(torch.randn(shape, generator=g, dtype=torch.float64))
        prior.diag.copy_(0.1 + torch.rand(d, generator=g, dtype=torch.float64))
        prior.factor.copy_(torch.randn(d, rank, generator=g, dtype=torch.float64))
        if learn is not None:
            prior.log_scale_factor.fill_(learn)
    return prior


def _reference(prior: SWAGSitePrior) -> LowRankMultivariateNormal:
    c = torch.tensor(prior.scale, dtype=torch.float64)
    if prior.log_scale_factor is not None:  # on the standard deviations
        c = c * torch.exp(2.0 * prior.log_scale_factor)
    factor = prior.factor if prior.rank else prior.factor.new_zeros(prior.diag.shape[0], 1)
    return LowRankMultivariateNormal(prior.loc.reshape(-1), c.sqrt() * factor, c * prior.diag)


def _posterior(shape=(3, 4), seed: int = 1) -> MeanFieldNormal:
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(shape, generator=g, dtype=torch.float64)
    log_scale = -1.0 + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    return MeanFieldNormal(loc.requires_grad_(), log_scale.requires_grad_(), "layer.weight")


@pytest.mark.parametrize("rank", [0, 1, 3, 12])
@pytest.mark.parametrize("learn", [None, 0.4])
def test_kl_equals_torch_distributions(rank: int, learn: float | None) -> None:
    prior, q = _site(rank, learn=learn), _posterior()
    dense = MultivariateNormal(q.loc.reshape(-1), torch.diag(q.scale.reshape(-1) ** 2))
    expected = kl_divergence(dense, _reference(prior))
    assert prior.kl_kind is dwp.priors.KLKind.EXACT
    torch.testing.assert_close(prior.kl(q), expected, rtol=1e-10, atol=1e-10)
    # and so do the gradients
    got = torch.autograd.grad(prior.kl(q), (q.loc, q.log_scale))
    want = torch.autograd.grad(expected, (q.loc, q.log_scale))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_the_cached_precision_follows_the_buffers(tmp_path: Path) -> None:
    prior, q = _site(3), _posterior()
    prior.kl(q)
    with torch.no_grad():
        prior.diag.mul_(2.0)  # edited in place
    dense = MultivariateNormal(q.loc.reshape(-1), torch.diag(q.scale.reshape(-1) ** 2))
    torch.testing.assert_close(prior.kl(q), kl_divergence(dense, _reference(prior)))
    prior.save(tmp_path / "site.pt")
    other = _site(3, seed=7)
    other.kl(q)
    other.load_state_dict(load_prior(tmp_path / "site.pt").double().state_dict())
    torch.testing.assert_close(other.kl(q), prior.kl(q))
    # a float32 copy evaluates float32 posteriors, and float64 ones in float64
    single = load_prior(tmp_path / "site.pt")
    q32 = MeanFieldNormal(q.loc.float(), q.log_scale.float(), q.name)
    assert single.kl(q32).dtype == torch.float32
    torch.testing.assert_close(single.kl(q32).double(), prior.kl(q), rtol=1e-5, atol=0)


@pytest.mark.parametrize("rank", [0, 2, 5])
def test_log_prob_equals_torch_distributions(rank: int) -> None:
    prior = _site(rank, learn=-0.3)
    values = torch.randn(4, 2, 3, 4, dtype=torch.float64)
    expected = _reference(prior).log_prob(values.reshape(4, 2, -1))
    torch.testing.assert_close(prior.log_prob(values), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(prior.log_prob(values[0, 0]), expected[0, 0])


def test_samples_have_the_prior_mean_and_covariance() -> None:
    torch.manual_seed(0)
    prior, n = _site(2, shape=(2, 2), scale=2.0), 20_000
    samples = torch.stack([prior.sample((2, 2)) for _ in range(n)]).reshape(n, -1)
    cov = _reference(prior).covariance_matrix
    sd = cov.diagonal().sqrt()
    # 5 standard errors: the mean's is sd / sqrt(n), a covariance entry's
    # sqrt((S_ii S_jj + S_ij^2) / n) for Gaussian samples
    assert torch.all((samples.mean(0) - prior.loc.reshape(-1)).abs() < 5 * sd / math.sqrt(n))
    error = (torch.cov(samples.T) - cov).abs()
    assert torch.all(error < 5 * ((sd[:, None] * sd[None]) ** 2 + cov**2).sqrt() / math.sqrt(n))


@pytest.mark.parametrize("rank", [0, 3])
def test_the_closed_form_log_scale_is_the_optimum_the_gradient_finds(rank: int) -> None:
    prior, q = _site(rank, learn=0.0), _posterior()
    q = MeanFieldNormal(q.loc.detach(), q.log_scale.detach(), q.name)
    optimiser = torch.optim.LBFGS(
        [prior.log_scale_factor], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15
    )

    def closure():
        optimiser.zero_grad()
        kl = prior.kl(q)
        kl.backward()
        return kl

    optimiser.step(closure)
    closed = prior.closed_form_log_scale(q)
    torch.testing.assert_close(prior.log_scale_factor.detach(), closed, rtol=1e-6, atol=1e-7)
    # dwp.empirical_bayes_ sets it on a model's sites
    net = dwp.bayesianize(_net(), dwp.SWAGPrior.from_moments(_moments()[1], learn_scale=True))
    dwp.empirical_bayes_(net)
    site = net[3].weight_prior
    torch.testing.assert_close(
        site.log_scale_factor.detach(), site.closed_form_log_scale(net[3].weight_posterior)
    )


# ---------------------------------------------------------------------------------------------
# The template: from moments, bound to layers, saved


def test_the_prior_is_swag_s_covariance_of_the_moments() -> None:
    net, moments = _moments(rank=3, steps=7)
    site = dwp.SWAGPrior.from_moments(moments, scale=0.5).for_site("3.weight", net[3].weight, 0)
    assert isinstance(site, SWAGSitePrior) and site.scale == 0.5
    torch.testing.assert_close(site.loc, moments.mean("3"))
    torch.testing.assert_close(site.diag, moments.variance("3").reshape(-1) / 2)
    expected = moments.deviations("3").reshape(3, -1).T.double() / math.sqrt(2 * (3 - 1))
    torch.testing.assert_close(site.factor, expected)
    # SWAG-diagonal without deviation columns; too few snapshots define no variance
    diagonal = dwp.SWAGPrior.from_moments(_moments(rank=0)[1]).for_site(
        "3.weight", net[3].weight, 0
    )
    assert diagonal.factor.shape == (net[3].weight.numel(), 0)
    with pytest.raises(ValueError, match="1 snapshot"):
        dwp.SWAGPrior.from_moments(_moments(steps=1)[1])


def test_bayesianize_with_prior_init_samples_the_prior() -> None:
    _, moments = _moments()
    torch.manual_seed(3)
    net = dwp.bayesianize(_net(), dwp.SWAGPrior.from_moments(moments, scale=1e-4), init="prior")
    for name in ("0", "3"):
        layer = net.get_submodule(name)
        assert isinstance(layer.weight_prior, SWAGSitePrior)
        # samples of a narrow prior lie next to the source mean
        assert (layer.weight - moments.mean(name)).abs().max() < 0.1
    assert torch.isfinite(dwp.kl(net)) and dwp.kl(net).requires_grad


def test_a_prior_of_another_architecture_is_rejected_naming_the_layer() -> None:
    _, moments = _moments()
    prior = dwp.SWAGPrior.from_moments(moments)
    with pytest.raises(dwp.PriorMismatchError, match=r"'3\.weight'.*shape \(2, 48\).*\(5, 48\)"):
        dwp.bayesianize(_net(outputs=5), prior)
    other = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(48, 2)).double()
    with pytest.raises(dwp.PriorMismatchError, match=r"no layer '2'"):
        dwp.bayesianize(other, prior)
    with pytest.raises(
        dwp.PriorMismatchError, match=r"'0\.bias': SWAG moments hold layer weights only"
    ):
        dwp.bayesianize(_net(), prior, bayesian_bias=True, bias_prior=prior)


def test_priors_and_moments_files_load_as_priors(tmp_path: Path) -> None:
    net, moments = _moments()
    prior = dwp.SWAGPrior.from_moments(moments, scale=0.3, learn_scale=True)
    prior.save(tmp_path / "prior.pt")
    moments.save(tmp_path / "swag.pt")
    q = dwp.bayesianize(_net(), prior)[3].weight_posterior
    for path, overrides in (("prior.pt", {}), ("swag.pt", {"scale": 0.3, "learn_scale": True})):
        loaded = dwp.SWAGPrior.load(tmp_path / path, **overrides)
        assert loaded.config() == prior.config()
        assert loaded.describe()["metadata"] == {"n_snapshots": 7, "deviation_columns": 3}
        for key, value in prior.state_dict().items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(loaded.state_dict()[key], value)
        site = loaded.for_site("3.weight", net[3].weight, 0)
        torch.testing.assert_close(site.kl(q), prior.for_site("3.weight", net[3].weight, 0).kl(q))
    # a site prior round-trips too, its learned factor included
    site = prior.for_site("3.weight", net[3].weight, 0)
    with torch.no_grad():
        site.log_scale_factor.fill_(0.25)
    site.save(tmp_path / "site.pt")
    again = load_prior(tmp_path / "site.pt")
    assert isinstance(again, SWAGSitePrior) and again.config() == site.config()
    torch.testing.assert_close(again.kl(q), site.kl(q))
    assert prior.describe()["kind"] == "SWAGPrior" and prior.describe()["kl_kind"] == "exact"


# ---------------------------------------------------------------------------------------------
# Held-out fit of the whole-network prior (dwp.priors.weight_report)


def test_marginal_keeps_each_weights_variance_and_drops_the_correlations() -> None:
    _, moments = _moments(rank=3, steps=7)
    prior = dwp.SWAGPrior.from_moments(moments, scale=0.5)
    marginal, pooled = prior.marginal(), prior.marginal(pooled=True)
    assert marginal.rank == 0 and pooled.rank == 0 and marginal.scale == 0.5
    full_variance = prior.diag + (prior.factor**2).sum(1)  # diag(A + U U^T)
    torch.testing.assert_close(marginal.diag, full_variance)
    torch.testing.assert_close(pooled.diag, full_variance.mean().expand_as(full_variance))
    torch.testing.assert_close(marginal.loc, prior.loc)


def test_weight_scores_are_the_closed_form_densities_per_weight() -> None:
    """Each score is log N(w; mu, c (A + U U^T)) summed over the layers, over their weights,
    against torch.distributions.LowRankMultivariateNormal; differences are paired."""
    net, moments = _moments(rank=3, steps=7)
    prior = dwp.SWAGPrior.from_moments(moments, scale=0.7).double()
    priors = {"swag": prior, "marginal": prior.marginal().double()}
    sites = ["0.weight", "3.weight"]
    held_out = []
    for seed in (5, 6, 7):
        _walk(net, 2, seed=seed)  # the trajectory goes on: snapshots the moments never saw
        held_out.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    scores = weight_scores(priors, held_out, sites, reference="marginal")
    n_weights = sum(held_out[0][s].numel() for s in sites)
    assert scores["weights"] == n_weights and scores["unit"] == "nats per weight"
    for name, template in priors.items():
        expected = []
        for state in held_out:
            total = 0.0
            for site in sites:
                site_prior = template.for_site(site, state[site], state[site].dim() - 2)
                total += float(_reference(site_prior).log_prob(state[site].reshape(-1)))
            expected.append(total / n_weights)
        assert scores["per_network"][name] == pytest.approx(expected, rel=1e-9, abs=1e-9)
    paired = torch.tensor(scores["per_network"]["swag"]) - torch.tensor(
        scores["per_network"]["marginal"]
    )
    assert scores["differences"]["swag"]["mean"] == pytest.approx(float(paired.mean()))
    table = render_weight_scores(scores)
    assert "3 held-out networks" in table and "| swag |" in table


def test_weight_scores_name_a_missing_site_and_a_bad_reference() -> None:
    net, moments = _moments()
    prior = dwp.SWAGPrior.from_moments(moments)
    state = net.state_dict()
    with pytest.raises(KeyError, match=r"no '9\.weight'"):
        weight_scores({"swag": prior}, [state], ["9.weight"])
    with pytest.raises(ValueError, match="reference 'x'"):
        weight_scores({"swag": prior}, [state], ["0.weight"], reference="x")
