"""dwp.bayesianize and dwp.to_deterministic: mean-mode equivalence on nested and MONAI
networks, copy vs in-place, site names, include/exclude selectors, posterior
initialisation, per-layer and template priors, Bayesian biases and the model KL.
"""

import copy
import math
import re

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

import dwp
from dwp.priors import LogUniformPrior, NormalPrior, PretrainedNormalPrior

TORCH_LAYERS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


class Net(nn.Module):
    """Conv3d, BatchNorm, ConvTranspose3d, Conv2d and a ModuleList of Linear heads, nested."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv3d(1, 2, 3, padding=1),
            nn.BatchNorm3d(2),
            nn.ReLU(),
            nn.ConvTranspose3d(2, 2, 3, stride=2, padding=1, output_padding=1),
        )
        mix = nn.Conv2d(
            2, 4, (3, 1), padding="same", dilation=2, groups=2, padding_mode="reflect", bias=False
        )
        self.mixer = nn.Sequential(nn.Sequential(mix), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(4, 2), nn.Linear(4, 1)])

    def forward(self, x):
        h = self.encoder(x).mean(dim=2)  # (B, 2, 2D, 2D)
        h = self.mixer(h).mean(dim=(2, 3))  # (B, 4)
        return torch.cat([head(h) for head in self.heads], dim=1)


SITES = {
    "encoder.0": dwp.BayesConv3d,
    "encoder.3": dwp.BayesConvTranspose3d,
    "mixer.0.0": dwp.BayesConv2d,
    "heads.0": dwp.BayesLinear,
    "heads.1": dwp.BayesLinear,
}


def _net():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # non-trivial running statistics for eval-mode BatchNorm
        net.encoder[1].running_mean.uniform_(-0.5, 0.5)
        net.encoder[1].running_var.uniform_(0.5, 2.0)
    return net, torch.randn(3, 1, 4, 4, 4)


def _bayes_sites(model):
    return {name: type(layer) for name, layer in dwp.bayesian_layers(model)}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, state):
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key


# -- 1. nested model -----------------------------------------------------------------------
def test_nested_model_mean_mode_equals_original_and_original_is_untouched():
    net, x = _net()
    before = _state(net)
    bayes = dwp.bayesianize(net, init_log_sigma=-1.0)
    assert bayes is not net
    assert _bayes_sites(bayes) == SITES
    assert {layer.site_name for _, layer in dwp.bayesian_layers(bayes)} == set(SITES)
    assert isinstance(bayes.encoder[1], nn.BatchNorm3d) and isinstance(bayes.heads, nn.ModuleList)
    # the original keeps its plain layers and weights
    assert _bayes_sites(net) == {}
    assert all(type(net.get_submodule(name)) in TORCH_LAYERS for name in SITES)
    _assert_same_state(net, before)

    net.eval()
    bayes.eval()
    expected = net(x)
    torch.testing.assert_close(bayes(x), expected)
    net.train()
    bayes.train()
    with dwp.sampling(False):
        torch.testing.assert_close(bayes(x), net(x))
    with dwp.sampling():
        assert not torch.allclose(bayes.eval()(x), expected, atol=1e-3)


def test_inplace_modifies_the_original():
    net, x = _net()
    net.eval()
    expected = net(x)
    conv = net.encoder[0]
    out = dwp.bayesianize(net, inplace=True)
    assert out is net
    assert _bayes_sites(net) == SITES
    assert net.encoder[0] is not conv and torch.equal(net.encoder[0].weight, conv.weight)
    torch.testing.assert_close(net(x), expected)


def test_shared_layer_is_converted_once_and_stays_shared():
    # one module registered under two names (weight tying) must stay one module: converting
    # only its first occurrence would silently untie the weights and leave a plain layer
    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    bayes = dwp.bayesianize(model)
    assert isinstance(bayes[0], dwp.BayesLinear)
    assert bayes[2] is bayes[0]
    plain = dwp.to_deterministic(bayes)
    assert type(plain[0]) is nn.Linear and plain[2] is plain[0]


def test_layer_settings_are_passed_on_and_dtype_and_mode_kept():
    net, x = _net()
    net = net.double().eval()
    net.heads[1].train()
    bayes = dwp.bayesianize(
        net, init_log_sigma=-3.0, estimator="flipout", mode="sample", bayesian_bias=True
    )
    for name, layer in dwp.bayesian_layers(bayes):
        assert layer.weight.dtype == torch.float64 and layer.weight_log_sigma.dtype == torch.float64
        assert layer.estimator is dwp.Estimator.FLIPOUT and layer.mode is dwp.Mode.SAMPLE
        torch.testing.assert_close(layer.weight_log_sigma, torch.full_like(layer.weight, -3.0))
        assert layer.training == net.get_submodule(name).training
    assert bayes(x.double()).dtype == torch.float64


def test_to_deterministic_gives_back_plain_layers():
    net, x = _net()
    net.eval()
    bayes = dwp.bayesianize(net, init_log_sigma=-1.0, bayesian_bias=True).eval()
    with torch.no_grad():  # a trained posterior mean differs from the original weights
        for _, layer in dwp.bayesian_layers(bayes):
            layer.weight.mul_(1.5)
    plain = dwp.to_deterministic(bayes)
    assert _bayes_sites(plain) == {}
    assert {name: type(plain.get_submodule(name)) for name in SITES} == {
        name: cls.torch_twin for name, cls in SITES.items()
    }
    assert _bayes_sites(bayes) == SITES  # not in place
    torch.testing.assert_close(plain(x), bayes(x))
    assert not torch.allclose(plain(x), net(x))


# -- 2. MONAI BasicUNet ----------------------------------------------------------------------
def test_monai_basic_unet_round_trip():
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    unet = nets.BasicUNet(
        spatial_dims=3, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4)
    ).eval()
    # 32^3, not 16^3: four poolings leave 1 voxel at 16^3, where InstanceNorm (the
    # default norm) refuses to normalise, in eval too (MONAI's limit, not dwp's)
    x = torch.randn(1, 1, 32, 32, 32)
    convs = [n for n, m in unet.named_modules() if type(m) in (nn.Conv3d, nn.ConvTranspose3d)]
    assert len(convs) > 10 and any(
        isinstance(unet.get_submodule(n), nn.ConvTranspose3d) for n in convs
    )

    bayes = dwp.bayesianize(unet).eval()
    assert sorted(name for name, _ in dwp.bayesian_layers(bayes)) == sorted(convs)
    assert not any(type(m) in (nn.Conv3d, nn.ConvTranspose3d) for m in bayes.modules())
    with torch.no_grad():
        expected = unet(x)
        torch.testing.assert_close(bayes(x), expected, rtol=0, atol=1e-5)
        with dwp.sampling():
            sample = bayes(x)
        assert sample.shape == expected.shape and not torch.allclose(sample, expected, atol=1e-5)

        plain = dwp.to_deterministic(bayes)
        assert not any(isinstance(m, dwp.BayesianLayer) for m in plain.modules())
        assert sorted(
            n for n, m in plain.named_modules() if type(m) in (nn.Conv3d, nn.ConvTranspose3d)
        ) == sorted(convs)
        torch.testing.assert_close(plain(x), expected, rtol=0, atol=1e-5)


# -- 3. include / exclude -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("selectors", "sites"),
    [
        (dict(include="encoder.*"), ["encoder.0", "encoder.3"]),
        (dict(include=["heads.1", "mixer.*"]), ["heads.1", "mixer.0.0"]),
        (dict(exclude="heads.*"), ["encoder.0", "encoder.3", "mixer.0.0"]),
        (dict(include=nn.Conv3d), ["encoder.0"]),
        (dict(include=(nn.Conv2d, nn.Linear), exclude="heads.0"), ["heads.1", "mixer.0.0"]),
        (dict(exclude=nn.Linear), ["encoder.0", "encoder.3", "mixer.0.0"]),
        (
            dict(include=lambda name, m: isinstance(m, nn.Linear) and m.out_features == 1),
            ["heads.1"],
        ),
        (
            dict(exclude=lambda name, m: name.startswith("encoder")),
            ["heads.0", "heads.1", "mixer.0.0"],
        ),
    ],
    ids=[
        "glob",
        "glob-list",
        "exclude-glob",
        "type",
        "types-minus-name",
        "exclude-type",
        "predicate",
        "exclude-predicate",
    ],
)
def test_include_and_exclude(selectors, sites):
    net, x = _net()
    bayes = dwp.bayesianize(net, **selectors)
    assert sorted(_bayes_sites(bayes)) == sites
    for name in set(SITES) - set(sites):
        assert type(bayes.get_submodule(name)) is type(net.get_submodule(name))
    torch.testing.assert_close(bayes.eval()(x), net.eval()(x))


def test_include_pattern_matching_nothing_raises_naming_it():
    net, _ = _net()
    with pytest.raises(ValueError, match="enocder"):
        dwp.bayesianize(net, include=["encoder.*", "enocder.*"])
    # a pattern that only matches excluded or non-convertible layers is unused too
    with pytest.raises(ValueError, match=r"encoder\.1"):
        dwp.bayesianize(net, include="encoder.1")
    assert _bayes_sites(net) == {}


def test_user_subclass_of_a_torch_layer_is_not_converted():
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2.0

    torch.manual_seed(0)
    model = nn.Sequential(MyConv(1, 2, 3), nn.Conv2d(2, 2, 1))
    bayes = dwp.bayesianize(model)
    assert type(bayes[0]) is MyConv
    assert isinstance(bayes[1], dwp.BayesConv2d)
    x = torch.randn(1, 1, 5, 5)
    torch.testing.assert_close(bayes.eval()(x), model.eval()(x))


# -- 4. initialisation -------------------------------------------------------------------------
def _wide_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 64))


def test_init_from_prior_samples_the_prior():
    # a prior fitted from source material (here: centred on the pretrained weights) is
    # sampled by init="prior"
    net = _wide_net()
    before = _state(net)
    torch.manual_seed(1)
    bayes = dwp.bayesianize(net, PretrainedNormalPrior(scale_factor=0.5), init="prior")
    _assert_same_state(net, before)
    for name, layer in dwp.bayesian_layers(bayes):
        w0 = net.get_submodule(name).weight
        z = ((layer.weight - w0) / (0.5 * w0.abs() + 1e-3)).detach().flatten()
        n = z.numel()  # 1152 and 4096
        # standardised N(w0, scale^2) draws: SE(mean) = 1 / sqrt(n), SE(std) ~= 1 / sqrt(2 n)
        assert abs(z.mean().item()) < 5 / math.sqrt(n)
        assert abs(z.std().item() - 1.0) < 5 / math.sqrt(2 * n)


def _dwp_on_convs(name, layer):
    """The issue's setting: a deep weight prior on the convs, N(0, 1) on the head."""
    if isinstance(layer, nn.Conv2d):
        return dwp.DeepWeightPrior({"all": dwp.KernelVAE((3, 3), hidden=4)})
    return NormalPrior()


def test_init_prior_leaves_a_non_informative_head_at_torchs_initialisation():
    # The defect: init="prior" drew the head from N(0, 1) (weight std 0.94 against
    # torch's 0.07 on real data).  Each layer starts from *its* prior: the convs from the
    # deep weight prior, the N(0, 1) head (and N(0, 1) Bayesian biases) from torch.
    net = _wide_net()
    torch.manual_seed(1)
    bayes = dwp.bayesianize(net, _dwp_on_convs, init="prior", bayesian_bias=True)
    head = bayes[3]
    bound = 1 / math.sqrt(64)  # torch's uniform bound for 64 input features (std 0.072)
    assert head.weight.abs().max() <= bound and head.bias.abs().max() <= bound
    assert 0.5 * bound / math.sqrt(3) < head.weight.std() < 2 * bound / math.sqrt(3)
    assert not torch.equal(head.weight, net[3].weight)  # fresh, not the pretrained head
    assert not torch.allclose(bayes[0].weight, net[0].weight)  # the convs: DWP samples
    assert dwp.priors.NormalPrior().init_sample((3, 3)) is None


def test_init_per_layer_by_pattern_or_function():
    net = _wide_net()
    torch.manual_seed(1)
    by_pattern = dwp.bayesianize(
        net, PretrainedNormalPrior(), init={"3": "fresh", "*": "prior", "0": "fresh"}
    )
    assert not torch.equal(by_pattern[3].weight, net[3].weight)  # fresh: torch's init
    assert by_pattern[3].weight.abs().max() <= 1 / math.sqrt(64)
    # the first matching pattern wins: "*" came before "0", so the conv is a prior sample
    assert not torch.equal(by_pattern[0].weight, net[0].weight)
    assert (by_pattern[0].weight - net[0].weight).abs().max() < 5 * 0.1 * net[0].weight.abs().max()
    # layers no pattern matches keep their weights
    kept = dwp.bayesianize(net, init={"3": "fresh"})
    assert torch.equal(kept[0].weight, net[0].weight) and not torch.equal(
        kept[3].weight, net[3].weight
    )
    calls = []

    def choose(name, layer):
        calls.append(name)
        return "fresh" if isinstance(layer, nn.Linear) else "pretrained"

    by_function = dwp.bayesianize(net, init=choose)
    assert calls == ["0", "3"]
    assert torch.equal(by_function[0].weight, net[0].weight)
    assert not torch.equal(by_function[3].weight, net[3].weight)


@pytest.mark.parametrize(
    ("init", "error"),
    [
        ({"head*": "fresh"}, r"init patterns \['head\*'\] match none"),
        ({"3": "random"}, r"init\['3'\] must be 'pretrained', 'prior' or 'fresh'"),
        (lambda name, layer: "random", r"init\('0', layer\) must be"),
    ],
    ids=["unmatched-pattern", "bad-value", "bad-answer"],
)
def test_per_layer_init_errors_name_the_pattern_or_layer(init, error):
    with pytest.raises(ValueError, match=error):
        dwp.bayesianize(_wide_net(), init=init)


def test_init_from_prior_uses_each_layers_own_prior_per_layer():
    net = _wide_net()
    bayes = dwp.bayesianize(net, _dwp_on_convs, init_log_sigma=-4.0)
    with torch.no_grad():
        bayes[3].weight.fill_(5.0)
    torch.manual_seed(1)
    dwp.init_from_prior_(bayes)  # prior=None: each Bayesian layer's own prior
    assert not torch.equal(bayes[0].weight, net[0].weight)  # a deep-weight-prior sample
    assert bayes[3].weight.abs().max() <= 1 / math.sqrt(64)  # N(0, 1) declines: torch's
    assert (bayes[3].weight_log_sigma == -4.0).all()  # the scales are kept
    before = bayes[0].weight.clone()
    dwp.init_from_prior_(bayes, init={"3": "fresh"})  # the conv keeps its weights
    assert torch.equal(bayes[0].weight, before)
    with pytest.raises(ValueError, match=r"layer '0' \(Conv2d\) is not Bayesian.*prior="):
        dwp.init_from_prior_(_wide_net())
    plain = _wide_net()
    dwp.init_from_prior_(plain, init="fresh")
    assert not torch.equal(plain[0].weight, net[0].weight) and torch.equal(
        plain[0].bias, net[0].bias
    )


def test_init_fresh_reinitialises_weights():
    net = _wide_net()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, TORCH_LAYERS):
                m.weight.fill_(5.0)
    bayes = dwp.bayesianize(net, init="fresh")
    for _, layer in dwp.bayesian_layers(bayes):
        # torch's default init: kaiming-uniform(a=sqrt(5)) has bound 1 / sqrt(fan_in)
        fan_in = layer.weight[0].numel()
        assert layer.weight.abs().max() <= 1.0 / math.sqrt(fan_in)
        assert layer.weight.std() > 0.1 / math.sqrt(fan_in)


@pytest.mark.parametrize("init", ["pretrain", "random", None])
def test_invalid_init_raises(init):
    net = _wide_net()
    with pytest.raises(ValueError, match="init"):
        dwp.bayesianize(net, init=init)


# -- 5. priors per layer -------------------------------------------------------------------------
def test_prior_callable_chooses_per_layer():
    net, _ = _net()
    calls = []

    def choose(name, layer):
        calls.append((name, type(layer)))
        return NormalPrior(0.0, 0.1) if isinstance(layer, nn.Linear) else LogUniformPrior()

    bayes = dwp.bayesianize(net, choose)
    assert sorted(calls) == sorted((name, cls.torch_twin) for name, cls in SITES.items())
    for name, layer in dwp.bayesian_layers(bayes):
        if name.startswith("heads"):
            assert isinstance(layer.weight_prior, NormalPrior)
            torch.testing.assert_close(layer.weight_prior.scale, torch.tensor(0.1))
        else:
            assert isinstance(layer.weight_prior, LogUniformPrior)


def test_pretrained_normal_template_binds_each_layers_own_weights():
    net, _ = _net()
    template = PretrainedNormalPrior(scale_factor=0.1, min_scale=1e-3)
    bayes = dwp.bayesianize(net, template)
    assert template.loc is None  # the template itself stays unbound and reusable
    priors = set()
    for name, layer in dwp.bayesian_layers(bayes):
        prior = layer.weight_prior
        priors.add(id(prior))
        w0 = net.get_submodule(name).weight
        assert torch.equal(prior.loc, w0)
        # posterior mean = centre: the KL is the closed form with no Mahalanobis term
        expected = kl_divergence(
            Normal(w0, layer.weight_log_sigma.exp()), Normal(w0, 0.1 * w0.abs() + 1e-3)
        ).sum()
        torch.testing.assert_close(layer.kl(), expected, rtol=1e-5, atol=1e-4)
        # and moving the mean away from the centre costs more
        with torch.no_grad():
            layer.weight.add_(0.1)
        assert layer.kl() > expected
    assert len(priors) == len(SITES)


@pytest.mark.parametrize("init", ["prior", "fresh"])
def test_pretrained_template_centres_on_the_original_weights_for_every_init(init):
    # the prior states what the pretrained network learned, whatever the posterior starts from
    net, _ = _net()
    torch.manual_seed(1)
    bayes = dwp.bayesianize(net, PretrainedNormalPrior(), init=init)
    for name, layer in dwp.bayesian_layers(bayes):
        w0 = net.get_submodule(name).weight
        torch.testing.assert_close(layer.weight_prior.loc, w0, rtol=0, atol=0)
        assert not torch.equal(layer.weight, w0)


# -- 6. Bayesian bias and model KL ------------------------------------------------------------
def test_bayesian_bias_and_model_kl():
    net, _ = _net()
    bayes = dwp.bayesianize(net, bayesian_bias=True, bias_prior=NormalPrior(0.0, 2.0))
    det = dwp.bayesianize(net)
    params = dict(bayes.named_parameters())
    for name, layer in dwp.bayesian_layers(bayes):
        has_bias = net.get_submodule(name).bias is not None
        assert (f"{name}.bias_log_sigma" in params) == has_bias
        assert layer.bayesian_bias == has_bias
    assert not any(key.endswith("bias_log_sigma") for key, _ in det.named_parameters())

    per_site = dwp.kl_per_site(bayes)
    assert set(per_site) == set(SITES)
    total = dwp.kl(bayes)
    torch.testing.assert_close(total, torch.stack(list(per_site.values())).sum())
    # the difference to deterministic biases is exactly the biases' KL to N(0, 2^2)
    bias_kl = sum(
        kl_divergence(Normal(layer.bias, layer.bias_log_sigma.exp()), Normal(0.0, 2.0)).sum()
        for _, layer in dwp.bayesian_layers(bayes)
        if layer.bayesian_bias
    )
    torch.testing.assert_close(total - dwp.kl(det), bias_kl, rtol=1e-4, atol=1e-3)
    assert dwp.kl(nn.Sequential(nn.Linear(2, 2))) == 0


def test_kl_of_a_submodule_keeps_qualified_site_names():
    net, x = _net()
    bayes = dwp.bayesianize(net)
    full = dwp.kl_per_site(bayes)
    per_site = dwp.kl_per_site(bayes.encoder)
    assert set(per_site) == {"0", "3"}  # keyed relative to the module passed
    torch.testing.assert_close(dwp.kl(bayes.encoder), full["encoder.0"] + full["encoder.3"])
    # ... without renaming the layers: errors still name them within the whole model
    assert {layer.site_name for _, layer in dwp.bayesian_layers(bayes)} == set(SITES)
    with torch.no_grad():
        bayes.encoder[0].weight_log_sigma.view(-1)[0] = math.nan
    with pytest.raises(dwp.NonFinitePosteriorError, match=re.escape("'encoder.0'")):
        bayes(x)


# -- 7. a bare layer ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layer",
    [nn.Linear(4, 3), nn.Conv2d(2, 3, 3), nn.ConvTranspose1d(2, 3, 3)],
    ids=["linear", "conv2d", "convT1d"],
)
def test_bare_layer_converts_and_back(layer):
    bayes = dwp.bayesianize(layer)
    twin = dwp.nn.bayesian_twin(type(layer))
    assert type(bayes) is twin and bayes.site_name == twin.__name__
    assert torch.equal(bayes.weight, layer.weight) and bayes.weight is not layer.weight
    x = (
        torch.randn(2, 4)
        if isinstance(layer, nn.Linear)
        else torch.randn(2, 2, *(5,) * (layer.weight.dim() - 2))
    )
    torch.testing.assert_close(bayes.eval()(x), layer.eval()(x))
    plain = dwp.to_deterministic(bayes)
    assert type(plain) is type(layer)
    torch.testing.assert_close(plain(x), layer(x))


def test_bare_linear_include_selectors():
    layer = nn.Linear(4, 3)
    assert isinstance(dwp.bayesianize(layer, include=nn.Linear), dwp.BayesLinear)
    assert dwp.bayesianize(layer, exclude=nn.Linear) is not layer  # a copy, unconverted
    assert type(dwp.bayesianize(layer, exclude=nn.Linear)) is nn.Linear
    net = copy.deepcopy(layer)
    assert dwp.bayesianize(net, inplace=True, exclude=nn.Linear) is net


def test_priors_returned_by_a_function_are_copied_once_per_object() -> None:
    shared, other = dwp.NormalPrior(0.0, 0.5), dwp.NormalPrior(0.0, 2.0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3), nn.Linear(4, 2))

    def choose(name: str, layer: nn.Module) -> dwp.Prior:
        return other if isinstance(layer, nn.Linear) else shared

    model = dwp.bayesianize(net, prior=choose)
    first, second, linear = (model[i].weight_prior for i in range(3))
    assert first is second  # one copy for the one object the function returned twice
    assert first is not shared and linear is not other
    assert float(first.scale) == 0.5 and float(linear.scale) == 2.0
