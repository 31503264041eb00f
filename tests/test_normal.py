"""dwp.normal: the Gaussian closed forms every module shares, against torch.distributions."""

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from dwp.normal import normal_entropy, normal_log_density, normal_nll_sum, standard_normal_kl


def _draws():
    g = torch.Generator().manual_seed(0)
    x, loc = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g)
    scale = torch.rand(5, 4, generator=g, dtype=torch.float64) + 0.1
    return x, loc.double(), scale


def test_log_density_and_nll_sum_match_torch():
    x, loc, scale = _draws()
    expected = Normal(loc, scale).log_prob(x)
    torch.testing.assert_close(normal_log_density(x, loc, scale), expected)
    torch.testing.assert_close(normal_nll_sum(x, loc, scale), -expected.sum())
    # broadcasting a float scale, as the Gaussian likelihood does
    torch.testing.assert_close(normal_log_density(x, 0.0, 2.0), Normal(0.0, 2.0).log_prob(x))


def test_entropy_matches_torch_and_stays_finite_for_tiny_scales():
    _, loc, scale = _draws()
    expected = Independent(Normal(loc, scale), 2).entropy()
    torch.testing.assert_close(normal_entropy(scale.log()), expected)
    tiny = torch.full((3,), -200.0, dtype=torch.float64)  # exp(-200) underflows nothing here
    assert torch.isfinite(normal_entropy(tiny))


@pytest.mark.parametrize("dims", [1, 6])
def test_standard_normal_kl_matches_torch(dims):
    _, loc, scale = _draws()
    loc, scale = loc[:, :dims], scale[:, :dims]
    expected = kl_divergence(Normal(loc, scale), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(standard_normal_kl(loc, scale), expected)
