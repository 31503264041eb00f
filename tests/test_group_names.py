"""Kernel priors whose groups are named after layers (``group_by="layer"``): names with
dots, which torch refuses as submodule and parameter names, must work through fitting,
saving, loading, binding to a network and the KL."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dwp
from dwp.priors import load_prior
from dwp.priors.groups import GroupModules, GroupParameters


def _nested_net() -> nn.Module:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    return nn.Sequential(block, nn.Sequential(nn.Conv2d(4, 2, 3, padding=1)))


def _bank() -> dwp.KernelBank:
    sources = [_nested_net() for _ in range(3)]
    for k, net in enumerate(sources):  # three different sources
        torch.manual_seed(k)
        for p in net.parameters():
            p.data.normal_()
    return dwp.collect_kernels(sources, group_by="layer", kernel_shape=(3, 3))


@pytest.mark.parametrize("name", ["a.b", "a%2Eb", "%", "plain", "x.y.z%"])
def test_group_containers_keep_every_name(name):
    modules = GroupModules({name: nn.Linear(1, 1), "other": nn.Linear(1, 1)})
    assert list(modules) == [name, "other"] == modules.keys()
    assert name in modules and "a" not in modules
    assert modules[name] is dict(modules.items())[name]
    params = GroupParameters(
        {name: nn.Parameter(torch.zeros(())), "other": nn.Parameter(torch.ones(()))}
    )
    # a plain dict's keys come sorted, as in torch's ParameterDict
    assert list(params.keys()) == sorted([name, "other"])
    assert params[name].item() == 0.0
    # escaped attribute names are distinct: no two group names share a state_dict key
    assert len(modules.state_dict()) == 4 and len(params.state_dict()) == 2


def test_escape_leaves_dotless_names_unchanged():
    # files written before the escape (groups such as "all" or "res0") load unchanged
    assert list(GroupModules({"res0": nn.Linear(1, 1)}).state_dict()) == [
        "res0.weight",
        "res0.bias",
    ]


@pytest.mark.parametrize("kind", ["dwp", "kernel_gaussian"])
def test_layer_named_groups_fit_save_load_bind_and_give_a_kl(tmp_path, kind):
    bank = _bank()
    groups = sorted(bank.groups())
    if kind == "dwp":
        prior = dwp.DeepWeightPrior.fit(bank, epochs=2, progress=False, seed=0)
        dotted = list(prior.vaes)
    else:
        prior = dwp.KernelGaussianPrior.fit(bank)
        dotted = list(prior.gaussians)
    assert any("." in g for g in dotted), dotted
    assert sorted(dotted) == groups
    prior.save(tmp_path / "prior.pt")
    loaded = load_prior(tmp_path / "prior.pt", learn_scale=True)
    for key, value in prior.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    target = dwp.bayesianize(_nested_net(), loaded)
    kl = dwp.kl(target)
    assert torch.isfinite(kl) and kl.requires_grad
    kl.backward()
    scales = loaded.log_scale_factors if kind == "dwp" else None
    if scales is not None:  # one learned scale per layer-named group
        assert sorted(scales.keys()) == sorted(dotted)
