"""dwp.fixed_sample: one posterior sample held for a whole block of forward passes."""

import pytest
import torch
from torch import nn

import dwp


@pytest.mark.parametrize("estimator", ["reparam", "local_reparam", "flipout"])
def test_one_sample_for_the_whole_block_then_the_means_return(estimator):
    torch.manual_seed(0)
    net = dwp.bayesianize(
        nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 1)),
        init_log_sigma=-1.0, bayesian_bias=True, estimator=estimator,
    )  # fmt: skip
    net.train()  # would sample on every forward pass
    x = torch.randn(2, 1, 6, 6)
    means = {k: v.clone() for k, v in net.state_dict().items() if torch.is_tensor(v)}
    generator = torch.Generator().manual_seed(1)
    with dwp.fixed_sample(net, generator):
        first, second = net(x), net(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # one network in the block
    # the network in the block is mu + sigma * eps with eps from the generator, site by site
    replay = torch.Generator().manual_seed(1)
    expected = dwp.to_deterministic(net)
    with torch.no_grad():
        for _, layer in dwp.bayesian_layers(net):
            twin = expected.get_submodule(layer.site_name)
            for name in ("weight", "bias"):
                mu, log_sigma = getattr(layer, name), getattr(layer, f"{name}_log_sigma")
                eps = torch.randn(mu.shape, generator=replay)
                getattr(twin, name).copy_(mu + log_sigma.exp() * eps)
    torch.testing.assert_close(first, expected(x))
    for key, value in net.state_dict().items():  # the means are back, bit for bit
        if torch.is_tensor(value):
            assert torch.equal(value, means[key]), key
    assert all(layer.mode is dwp.Mode.AUTO for _, layer in dwp.bayesian_layers(net))


def test_means_are_restored_after_an_error():
    net = dwp.bayesianize(nn.Linear(3, 2), init_log_sigma=0.0)
    before = net.weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"), dwp.fixed_sample(net):
        assert not torch.equal(net.weight, before)
        raise RuntimeError("boom")
    assert torch.equal(net.weight, before)
