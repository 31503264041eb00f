"""dwp.select: one parser for include= / exclude=, and one walk over a model's layers that
never enters a prior (a deep weight prior's VAE is made of torch layers too)."""

import pytest
import torch
from torch import nn

import dwp
from dwp.select import LayerSelector, bayesian_layers, model_layers


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 2, 3), nn.ReLU(), nn.Conv3d(2, 2, 3), nn.Linear(2, 2))


def _dwp_prior():
    torch.manual_seed(1)
    return dwp.DeepWeightPrior({"all": dwp.KernelVAE((3, 3, 3))})


def test_selector_accepts_patterns_types_mixes_and_predicates():
    conv, linear = nn.Conv3d(1, 1, 3), nn.Linear(1, 1)
    assert LayerSelector(None)("x", conv) and not LayerSelector(None, default=False)("x", conv)
    assert LayerSelector("enc.*")("enc.0", linear) and not LayerSelector("enc.*")("dec", conv)
    assert LayerSelector(nn.Conv3d)("any", conv) and not LayerSelector(nn.Conv3d)("any", linear)
    mixed = LayerSelector([nn.Linear, "dec*"])  # a list, not only a tuple, of types
    assert mixed("x", linear) and mixed("dec1", conv) and not mixed("enc", conv)
    assert LayerSelector(lambda name, module: name == "a")("a", conv)
    by_name = LayerSelector(lambda name: name.startswith("a"), takes_module=False)
    assert by_name("ab") and not by_name("b")
    assert LayerSelector(["a.*", "b", "c[12]"]).exact_names == {"b"}
    assert LayerSelector(["a.*", "zz*"]).unused_patterns(["a.1", "b"]) == ["zz*"]


@pytest.mark.parametrize(
    ("spec", "takes_module", "message"),
    [
        ([1, 2], True, "include must be name patterns, layer types or a predicate"),
        ([nn.Conv3d], False, "include must be name patterns or a predicate"),
    ],
)
def test_selector_rejects_other_things(spec, takes_module, message):
    with pytest.raises(TypeError, match=message):
        LayerSelector(spec, "include", takes_module=takes_module)


def test_bayesianize_takes_a_list_of_types():
    bnn = dwp.bayesianize(_net(), include=[nn.Conv3d])
    assert [name for name, _ in dwp.bayesian_layers(bnn)] == ["0", "2"]


def test_a_pattern_that_matches_only_bayesian_layers_says_so():
    bnn = dwp.bayesianize(_net(), include=["0"])
    with pytest.raises(ValueError, match=r"\['0'\] match layers .* Bayesian already"):
        dwp.bayesianize(bnn, include=["0"])
    with pytest.raises(ValueError, match=r"\['nothing'\] match no convertible layer"):
        dwp.bayesianize(bnn, include=["nothing"])


def test_the_walk_does_not_enter_priors():
    model = dwp.bayesianize(_net(), _dwp_prior(), include=[nn.Conv3d])
    inside = [n for n, _ in model.named_modules() if "weight_prior" in n]
    assert inside  # the prior's VAE is a submodule tree of the model
    assert not any("weight_prior" in n for n, _ in model_layers(model))
    assert [n for n, _ in bayesian_layers(model)] == ["0", "2"]


def test_bayesianize_again_leaves_the_prior_alone():
    """A prior's internals are never layers of the model: converting again must not turn
    the VAE's linear layers Bayesian (nor its frozen decoder into parameters)."""
    model = dwp.bayesianize(_net(), _dwp_prior(), include=[nn.Conv3d])
    n_params = sum(p.numel() for p in model.parameters())
    again = dwp.bayesianize(model, dwp.NormalPrior())  # the remaining torch layers
    assert [n for n, _ in dwp.bayesian_layers(again)] == ["0", "2", "3"]
    head = 2 * 2  # the Linear head's weight gets a log-sigma; nothing else is added
    assert sum(p.numel() for p in again.parameters()) == n_params + head
    torch.manual_seed(0)
    expected = dwp.kl(model)
    torch.manual_seed(0)  # the same draws: the deep weight prior's sites come first
    torch.testing.assert_close(dwp.kl(again) - again[3].kl(), expected)


def test_collect_kernels_and_init_from_prior_skip_a_conv_vae_prior():
    torch.manual_seed(2)
    prior = dwp.DeepWeightPrior({"all": dwp.KernelVAE((3, 3, 3), architecture="conv")})
    model = dwp.bayesianize(_net(), prior, include=[nn.Conv3d])
    bank = dwp.collect_kernels(model, kernel_shape=(3, 3, 3))
    assert bank.layer_names == ["0", "2"]  # not the conv VAE's own 3x3x3 kernels

    def prior_state():
        return {
            k: v.clone()
            for k, v in model.state_dict().items()
            if "weight_prior" in k and isinstance(v, torch.Tensor)
        }

    before = prior_state()
    dwp.init_from_prior_(model, dwp.NormalPrior(0.0, 0.1), include=nn.Conv3d)
    after = prior_state()
    assert before and all(torch.equal(before[k], after[k]) for k in before)
