"""Bayesian layers (dwp.nn): torch-identical signatures, mean mode equal to the torch twin,
output moments of every estimator against their closed forms, sample/mean modes and their
switches, the non-finite posterior check, summed KL, gradients, state_dict round trips and
the initial posterior scale.
"""

import inspect
import io
import math
import re
import threading
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, kl_divergence

import dwp
from dwp.priors import LogUniformPrior, NormalPrior, PretrainedNormalPrior
from dwp.settings import Estimator, Mode, global_estimator, validation_enabled

CONV = {1: dwp.BayesConv1d, 2: dwp.BayesConv2d, 3: dwp.BayesConv3d}
CONV_T = {1: dwp.BayesConvTranspose1d, 2: dwp.BayesConvTranspose2d, 3: dwp.BayesConvTranspose3d}
BAYES_CLASSES = [*CONV.values(), *CONV_T.values(), dwp.BayesLinear]
ESTIMATORS = ["reparam", "local_reparam", "flipout"]
BAYES_OPTIONS = {"prior", "bias_prior", "bayesian_bias", "init_log_sigma", "estimator", "mode"}


def _copy_from(bayes: dwp.BayesianLayer, twin: nn.Module, log_sigma: float = -1.0):
    """Give ``bayes`` the twin's weights as posterior mean and a scale large enough that
    sampling is visibly different from the mean."""
    with torch.no_grad():
        bayes.weight.copy_(twin.weight)
        if twin.bias is not None:
            bayes.bias.copy_(twin.bias)
        bayes.weight_log_sigma.fill_(log_sigma)
    return bayes


def _twins(cls, *args, bayes_kwargs=(), **kwargs):
    torch.manual_seed(0)
    twin = cls.torch_twin(*args, **kwargs)
    return twin, _copy_from(cls(*args, **kwargs, **dict(bayes_kwargs)), twin)


def _assert_mean_mode_is_twin(bayes, twin, *inputs, **call_kwargs):
    expected = twin(*inputs, **call_kwargs)
    bayes.train()
    with dwp.sampling(False):
        torch.testing.assert_close(bayes(*inputs, **call_kwargs), expected)
    bayes.eval()
    torch.testing.assert_close(bayes(*inputs, **call_kwargs), expected)
    # the comparison can fail: a sample from the posterior (sigma = e^-1) is not the mean
    bayes.train()
    assert not torch.allclose(bayes(*inputs, **call_kwargs), expected, atol=1e-3)


# -- 1. signatures ---------------------------------------------------------------------
def _describe(params):
    return [(p.name, p.default, p.kind) for p in params]


@pytest.mark.parametrize("cls", BAYES_CLASSES, ids=lambda c: c.__name__)
def test_signature_is_the_torch_twins_plus_keyword_only_options(cls):
    torch_params = list(inspect.signature(cls.torch_twin).parameters.values())
    params = list(inspect.signature(cls).parameters.values())
    assert _describe(params[: len(torch_params)]) == _describe(torch_params)
    extra = params[len(torch_params) :]
    assert {p.name for p in extra} == BAYES_OPTIONS
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)
    # every advertised keyword is accepted by the constructor
    first = [3, 4] if cls is dwp.BayesLinear else [4, 4, 3]
    layer = cls(
        *first,
        prior=NormalPrior(),
        bias_prior=NormalPrior(),
        bayesian_bias=True,
        init_log_sigma=-4.0,
        estimator="flipout",
        mode="mean",
    )
    assert isinstance(layer, cls.torch_twin) and isinstance(layer, dwp.BayesianLayer)
    assert layer.bayesian_bias and layer.init_log_sigma == -4.0
    assert layer.estimator is Estimator.FLIPOUT and layer.mode is Mode.MEAN


_POSITIONAL = {
    # the torch twin's own arguments, all passed positionally (through bias and beyond)
    dwp.BayesConv1d: (4, 6, 3, 2, 1, 2, 2, False, "reflect"),
    dwp.BayesConv2d: (4, 6, (3, 1), 2, 1, 2, 2, False, "circular"),
    dwp.BayesConv3d: (4, 6, (3, 1, 2), 2, 1, 1, 2, False),
    dwp.BayesConvTranspose1d: (4, 6, 3, 2, 1, 1, 2, False, 2),
    dwp.BayesConvTranspose2d: (4, 6, (3, 1), 2, 1, 1, 2, False, 2),
    dwp.BayesConvTranspose3d: (4, 6, (3, 1, 2), 2, 1, 1, 2, False, 2),
    dwp.BayesLinear: (4, 6, False),
}


@pytest.mark.parametrize("cls", BAYES_CLASSES, ids=lambda c: c.__name__)
def test_positional_construction_matches_torch_twin(cls):
    args = _POSITIONAL[cls]
    twin, bayes = cls.torch_twin(*args), cls(*args)
    assert isinstance(bayes, cls.torch_twin)
    assert bayes.weight.shape == twin.weight.shape
    assert bayes.bias is None and twin.bias is None
    # the Bayesian repr is the twin's (stride, padding, groups, ...) plus its own options
    assert bayes.extra_repr().startswith(twin.extra_repr() + ", estimator=reparam")


def test_bayes_conv3d_is_a_conv3d():
    layer = dwp.BayesConv3d(1, 2, 3)
    assert isinstance(layer, nn.Conv3d)
    assert isinstance(layer, dwp.BayesianLayer)
    assert dwp.BayesConv3d.torch_twin is nn.Conv3d


# -- 2. mean mode equals the torch twin --------------------------------------------------
def _kernel(d):
    return (3, 1, 2)[:d] if d > 1 else 4


CONV_CASES = [
    pytest.param(d, kw, id=f"{d}d-{name}")
    for d in (1, 2, 3)
    for name, kw in {
        "plain": dict(in_channels=4, out_channels=6, kernel_size=3),
        "stride2-pad1-nobias": dict(
            in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, bias=False
        ),
        "same-dil2-noncubic": dict(
            in_channels=4, out_channels=6, kernel_size=_kernel(d), padding="same", dilation=2
        ),
        "groups2-reflect": dict(
            in_channels=4,
            out_channels=6,
            kernel_size=3,
            padding=1,
            groups=2,
            padding_mode="reflect",
        ),
        "same-reflect-noncubic": dict(
            in_channels=4,
            out_channels=6,
            kernel_size=_kernel(d),
            padding="same",
            padding_mode="reflect",
        ),
        "circular-stride2-noncubic": dict(
            in_channels=4,
            out_channels=6,
            kernel_size=_kernel(d),
            stride=2,
            padding=2,
            padding_mode="circular",
            bias=False,
        ),
        "replicate-dil2-groups2": dict(
            in_channels=4,
            out_channels=6,
            kernel_size=_kernel(d),
            padding=1,
            dilation=2,
            groups=2,
            padding_mode="replicate",
        ),
    }.items()
]


@pytest.mark.parametrize(("dims", "kwargs"), CONV_CASES)
def test_conv_mean_mode_equals_torch_twin(dims, kwargs):
    twin, bayes = _twins(CONV[dims], **kwargs)
    x = torch.randn(2, 4, *(7,) * dims)
    _assert_mean_mode_is_twin(bayes, twin, x)


CONV_T_CASES = [
    pytest.param(d, kw, id=f"{d}d-{name}")
    for d in (1, 2, 3)
    for name, kw in {
        "plain": dict(in_channels=4, out_channels=6, kernel_size=3),
        "stride2-outpad1-nobias": dict(
            in_channels=4,
            out_channels=6,
            kernel_size=3,
            stride=2,
            padding=1,
            output_padding=1,
            bias=False,
        ),
        "groups2-dil2-noncubic": dict(
            in_channels=4, out_channels=6, kernel_size=_kernel(d), groups=2, dilation=2, padding=1
        ),
    }.items()
]


@pytest.mark.parametrize(("dims", "kwargs"), CONV_T_CASES)
def test_conv_transpose_mean_mode_equals_torch_twin(dims, kwargs):
    twin, bayes = _twins(CONV_T[dims], **kwargs)
    x = torch.randn(2, 4, *(5,) * dims)
    _assert_mean_mode_is_twin(bayes, twin, x)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_transpose_output_size_argument(dims):
    twin, bayes = _twins(CONV_T[dims], 4, 6, 3, stride=2, padding=1)
    x = torch.randn(2, 4, *(5,) * dims)
    size = [10] * dims  # default would be (5 - 1) * 2 - 2 + 3 = 9; 10 needs output_padding 1
    _assert_mean_mode_is_twin(bayes, twin, x, output_size=size)
    for estimator in ESTIMATORS:
        with dwp.sampling(), dwp.estimator(estimator):
            assert bayes(x, output_size=size).shape == (2, 6, *size)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=["unbatched", "batched", "extra-dims"])
def test_linear_mean_mode_equals_torch_twin(lead, bias):
    twin, bayes = _twins(dwp.BayesLinear, 5, 4, bias=bias)
    _assert_mean_mode_is_twin(bayes, twin, torch.randn(*lead, 5))


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("cls", BAYES_CLASSES, ids=lambda c: c.__name__)
def test_sample_mode_shapes_and_unbatched_inputs(cls, estimator):
    # every estimator keeps the twin's output shape, batched and unbatched
    args = (4, 6) if cls is dwp.BayesLinear else (4, 6, 3)
    twin, bayes = _twins(cls, *args, bayes_kwargs=dict(bayesian_bias=True, estimator=estimator))
    spatial = () if cls is dwp.BayesLinear else (5,) * bayes.kernel_dims
    for x in (torch.randn(2, 4, *spatial), torch.randn(4, *spatial)):
        out = bayes(x)
        assert out.shape == twin(x).shape
        assert torch.isfinite(out).all()


# -- 3. estimator moments -----------------------------------------------------------------
N_SAMPLES = 2000
Z_MAX = 5.0


def _reflect_conv3d(inp, w, b):
    return F.conv3d(F.pad(inp, (1,) * 6, mode="reflect"), w, b, groups=2)


# kind -> (layer factory, input shape, the twin's functional op)
MOMENT_KINDS = {
    "conv2d": (
        lambda **kw: dwp.BayesConv2d(2, 3, 3, padding=1, **kw),
        (1, 2, 4, 4),
        lambda inp, w, b: F.conv2d(inp, w, b, padding=1),
    ),
    "conv3d-reflect-groups": (
        lambda **kw: dwp.BayesConv3d(
            2, 4, (3, 1, 2), padding=1, groups=2, padding_mode="reflect", **kw
        ),
        (1, 2, 2, 2, 2),
        _reflect_conv3d,
    ),
    "convT1d-groups": (
        lambda **kw: dwp.BayesConvTranspose1d(
            4, 2, 3, stride=2, padding=1, output_padding=1, groups=2, **kw
        ),
        (1, 4, 3),
        lambda inp, w, b: F.conv_transpose1d(
            inp, w, b, stride=2, padding=1, output_padding=1, groups=2
        ),
    ),
    "linear": (lambda **kw: dwp.BayesLinear(5, 4, **kw), (1, 5), F.linear),
}


def _moment_layer(kind, regime, bayesian_bias, estimator):
    """A float64 layer with random mu and sigma, its input, and the analytic moments
    E[y] = op(x, mu) + b,  Var[y] = op(x^2, sigma^2) (+ sigma_b^2)."""
    g = torch.Generator().manual_seed(1)
    make, shape, op = MOMENT_KINDS[kind]
    layer = make(bayesian_bias=bayesian_bias, estimator=estimator, dtype=torch.float64)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    # sigma comparable to |mu|, or sigma << |mu| (after pretrained init; blitz's flipout
    # inflated the std 9-21x there)
    ratio = (0.5, 1.5) if regime == "comparable" else (0.005, 0.02)

    def draw(shape):
        mu = torch.randn(shape, generator=g, dtype=torch.float64)
        sigma = (
            mu.abs() * torch.empty(shape, dtype=torch.float64).uniform_(*ratio, generator=g) + 1e-6
        )
        return mu, sigma

    w_mu, w_sigma = draw(layer.weight.shape)
    b_mu, b_sigma = draw(layer.bias.shape)
    with torch.no_grad():
        layer.weight.copy_(w_mu)
        layer.weight_log_sigma.copy_(w_sigma.log())
        layer.bias.copy_(b_mu)
        if bayesian_bias:
            layer.bias_log_sigma.copy_(b_sigma.log())
    mean = op(x, w_mu, b_mu)[0]
    var = op(x * x, w_sigma**2, b_sigma**2 if bayesian_bias else None)[0]
    return layer.train(), x, mean, var


def _draws(layer, x, estimator, n):
    """n independent output samples, shape (n, *out)."""
    if estimator == "local_reparam":
        # pre-activations are sampled independently per element: one forward of n copies
        return layer(x.expand(n, *x.shape[1:]))
    # reparam shares one weight sample across the batch; flipout's examples share delta
    # (uncorrelated but not independent), so draw one forward per sample
    return torch.cat([layer(x) for _ in range(n)])


@pytest.mark.parametrize("bayesian_bias", [False, True], ids=["det-bias", "bayes-bias"])
@pytest.mark.parametrize("regime", ["comparable", "small-sigma"])
@pytest.mark.parametrize("kind", list(MOMENT_KINDS))
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimator_output_moments_match_closed_form(estimator, kind, regime, bayesian_bias):
    layer, x, mean, var = _moment_layer(kind, regime, bayesian_bias, estimator)
    torch.manual_seed(0)
    with torch.no_grad():
        y = _draws(layer, x, estimator, N_SAMPLES)
    n = y.shape[0]
    # Every estimator's per-element marginal is exactly Gaussian, and the n draws are
    # independent, so: SE(sample mean) = sqrt(Var / n), SE(sample variance) =
    # Var * sqrt(2 / (n - 1)).  With <= 96 elements x 2 statistics, P(max |z| >= 5) < 2e-4.
    z_mean = (y.mean(0) - mean) / (var / n).sqrt()
    z_var = (y.var(0) - var) / (var * math.sqrt(2.0 / (n - 1)))
    assert z_mean.abs().max() < Z_MAX, f"mean off by {z_mean.abs().max():.1f} standard errors"
    assert z_var.abs().max() < Z_MAX, (
        f"variance off by {z_var.abs().max():.1f} standard errors "
        f"(std ratio up to {(y.var(0) / var).sqrt().max():.2f})"
    )


@pytest.mark.parametrize("kind", ["conv2d", "linear"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_identical_examples_share_noise_only_under_reparam(estimator, kind):
    layer, x, _, _ = _moment_layer(kind, "comparable", False, estimator)
    pair = torch.cat([x, x])
    torch.manual_seed(0)
    with torch.no_grad():
        out = layer(pair)
    if estimator == "reparam":
        # one weight sample per forward pass, shared by the batch
        assert torch.equal(out[0], out[1])
    else:
        # flipout: one sign pattern per example; local reparam: noise per element
        assert not torch.allclose(out[0], out[1])

    # Over R forwards the two examples' outputs are perfectly correlated under reparam and
    # uncorrelated otherwise (flipout's sign flips decorrelate examples).  The sample
    # correlation of uncorrelated a, b has SE sqrt(E[a^2 b^2] / R) / Var; for flipout's
    # shared delta E[a^2 b^2] <= 3 Var^2 (a Gaussian fourth moment), so SE <= sqrt(3 / R).
    reps = 2000
    with torch.no_grad():
        ys = torch.stack([layer(pair) for _ in range(reps)]).flatten(2)  # (R, 2, out)
    a, b = ys[:, 0] - ys[:, 0].mean(0), ys[:, 1] - ys[:, 1].mean(0)
    corr = (a * b).mean(0) / (a.pow(2).mean(0) * b.pow(2).mean(0)).sqrt()
    if estimator == "reparam":
        torch.testing.assert_close(corr, torch.ones_like(corr))
    else:
        assert corr.abs().max() < Z_MAX * math.sqrt(3.0 / reps)


# -- 4. modes -----------------------------------------------------------------------------
def _pair():
    """A plain torch model and its Bayesian copy (posterior mean = plain weights)."""
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)
    )
    bayes = nn.Sequential(
        _copy_from(dwp.BayesConv2d(2, 3, 3, padding=1), plain[0]),
        nn.ReLU(),
        nn.Flatten(),
        _copy_from(dwp.BayesLinear(3 * 4 * 4, 2), plain[3]),
    )
    return plain, bayes, torch.randn(4, 2, 4, 4)


def _layers(model):
    return [m for m in model.modules() if isinstance(m, dwp.BayesianLayer)]


def test_default_mode_samples_in_train_and_uses_mean_in_eval():
    plain, bayes, x = _pair()
    assert all(layer.mode is Mode.AUTO for layer in _layers(bayes))
    assert all(layer.estimator is Estimator.REPARAM for layer in _layers(bayes))
    bayes.train()
    assert not torch.equal(bayes(x), bayes(x))
    bayes.eval()
    out = bayes(x)
    assert torch.equal(out, bayes(x))
    torch.testing.assert_close(out, plain(x))


def test_sampling_context_in_eval_and_mean_context_in_train():
    plain, bayes, x = _pair()
    bayes.eval()
    with dwp.sampling():
        assert not torch.equal(bayes(x), bayes(x))
    assert torch.equal(bayes(x), bayes(x))  # restored

    bayes.train()
    with dwp.sampling(False):
        out = bayes(x)
        assert torch.equal(out, bayes(x))
        torch.testing.assert_close(out, plain(x))
    assert not torch.equal(bayes(x), bayes(x))  # restored


def test_sampling_context_restricted_to_one_model():
    _, bayes, x = _pair()
    _, other, _ = _pair()
    bayes.eval()
    other.eval()
    with dwp.sampling(model=bayes):
        assert all(layer.mode is Mode.SAMPLE for layer in _layers(bayes))
        assert all(layer.mode is Mode.AUTO for layer in _layers(other))
        assert not torch.equal(bayes(x), bayes(x))
        assert torch.equal(other(x), other(x))
    assert all(layer.mode is Mode.AUTO for layer in _layers(bayes))


def _identical_examples_differ(model, x):
    with torch.no_grad():
        out = model(torch.cat([x[:1], x[:1]]))
    return not torch.equal(out[0], out[1])


def test_estimator_context_for_one_model_is_restored():
    _, bayes, x = _pair()
    _, other, _ = _pair()
    bayes[3].estimator = Estimator.LOCAL_REPARAM  # a per-layer setting to restore
    before = [layer.estimator for layer in _layers(bayes)]
    with dwp.estimator("flipout", bayes):
        assert all(layer.estimator is Estimator.FLIPOUT for layer in _layers(bayes))
        assert all(layer.estimator is Estimator.REPARAM for layer in _layers(other))
        assert _identical_examples_differ(bayes, x)
        assert not _identical_examples_differ(other, x)
    assert [layer.estimator for layer in _layers(bayes)] == before
    assert not _identical_examples_differ(other, x)


def test_thread_wide_estimator_overrides_layer_settings_and_is_restored():
    _, bayes, x = _pair()
    _, twin, _ = _pair()
    dwp.set_estimator(bayes, "flipout")
    dwp.set_estimator(twin, "local_reparam")
    torch.manual_seed(3)
    expected = twin(x)  # the same random stream, drawn by local reparam
    torch.manual_seed(3)
    flipout = bayes(x)

    seen_by_other_thread = []
    with dwp.estimator("local_reparam"):
        assert all(layer.estimator is Estimator.FLIPOUT for layer in _layers(bayes))
        assert all(
            layer.effective_estimator() is Estimator.LOCAL_REPARAM for layer in _layers(bayes)
        )
        torch.manual_seed(3)
        torch.testing.assert_close(bayes(x), expected, rtol=0, atol=0)
        thread = threading.Thread(target=lambda: seen_by_other_thread.append(global_estimator()))
        thread.start()
        thread.join()
    assert seen_by_other_thread == [None]  # thread-wide means this thread only
    assert global_estimator() is None
    assert all(layer.effective_estimator() is Estimator.FLIPOUT for layer in _layers(bayes))
    torch.manual_seed(3)
    torch.testing.assert_close(bayes(x), flipout, rtol=0, atol=0)
    assert not torch.allclose(flipout, expected)


def test_set_estimator_and_set_mode_persist():
    plain, bayes, x = _pair()
    assert dwp.set_estimator(bayes, "flipout") is bayes
    assert all(layer.estimator is Estimator.FLIPOUT for layer in _layers(bayes))
    assert _identical_examples_differ(bayes.train(), x)

    assert dwp.set_mode(bayes, "mean") is bayes
    bayes.train()
    torch.testing.assert_close(bayes(x), plain(x))
    assert dwp.set_mode(bayes, Mode.SAMPLE) is bayes
    bayes.eval()
    assert not torch.equal(bayes(x), bayes(x))
    assert all(layer.estimator is Estimator.FLIPOUT for layer in _layers(bayes))


@pytest.mark.parametrize(
    "call",
    [
        lambda m: dwp.estimator("bogus"),
        lambda m: dwp.estimator("bogus", m),
        lambda m: dwp.set_estimator(m, "bogus"),
        lambda m: dwp.set_mode(m, "bogus"),
        lambda m: dwp.BayesLinear(2, 3, estimator="bogus"),
        lambda m: dwp.BayesLinear(2, 3, mode="bogus"),
    ],
    ids=[
        "estimator-ctx",
        "estimator-ctx-model",
        "set_estimator",
        "set_mode",
        "layer-estimator",
        "layer-mode",
    ],
)
def test_invalid_estimator_or_mode_raises(call):
    _, bayes, _ = _pair()
    with pytest.raises(ValueError, match="bogus"):
        call(bayes)
    assert all(layer.estimator is Estimator.REPARAM for layer in _layers(bayes))
    assert all(layer.mode is Mode.AUTO for layer in _layers(bayes))


# -- 5. non-finite posterior ----------------------------------------------------------------
def _named_model(**kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            encoder=nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU()),
            flat=nn.Flatten(),
            head=nn.Linear(3 * 4 * 4, 2),
        )
    )
    return dwp.bayesianize(model, **kwargs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("param", ["weight", "weight_log_sigma", "bias_log_sigma"])
@pytest.mark.parametrize("site", ["encoder.0", "head"])
def test_non_finite_posterior_raises_naming_the_layer(site, param, value, training):
    model = _named_model(bayesian_bias=True).train(training)
    x = torch.randn(2, 2, 4, 4)
    layer = model.get_submodule(site)
    with torch.no_grad():
        getattr(layer, param).view(-1)[1] = value
    with pytest.raises(dwp.NonFinitePosteriorError, match=re.escape(repr(site))) as info:
        model(x)
    assert repr(param) in str(info.value)

    enabled = validation_enabled()
    dwp.set_validation(False)
    try:
        model(x)  # no check, no error (the output may well be NaN)
    finally:
        dwp.set_validation(enabled)
    with pytest.raises(dwp.NonFinitePosteriorError):
        model(x)


@pytest.fixture
def deferred_checks(monkeypatch):
    """Layers on the CPU queue their finiteness checks, as they do on an accelerator."""
    monkeypatch.setattr(dwp.nn, "_defers_check", lambda device: True)
    dwp.check_posteriors()  # nothing left over from another test
    yield
    dwp.nn._deferred.clear()


@pytest.mark.parametrize("param", ["weight", "weight_log_sigma", "bias_log_sigma"])
def test_deferred_posterior_check_names_the_layer_at_the_elbo(deferred_checks, param):
    model = _named_model(bayesian_bias=True)
    x = torch.randn(2, 2, 4, 4)
    with torch.no_grad():
        getattr(model.get_submodule("head"), param).view(-1)[1] = math.nan
    nll = model(x).sum()  # queued, not raised: no synchronisation in the forward pass
    assert len(dwp.nn._deferred) == 2  # one entry per Bayesian layer
    with pytest.raises(dwp.NonFinitePosteriorError, match=re.escape("'head'")) as info:
        dwp.elbo(nll, model, n_data=4, batch_size=2)  # the cause, not NonFiniteLossError
    assert repr(param) in str(info.value)
    assert not dwp.nn._deferred  # read once
    dwp.check_posteriors()  # and not raised twice


def test_deferred_posterior_check_in_predict_and_every_max_calls(deferred_checks, monkeypatch):
    model = _named_model()
    x = torch.randn(2, 2, 4, 4)
    dwp.predict(model, x, n_samples=2, task="classification")  # finite: nothing raised
    assert not dwp.nn._deferred
    with torch.no_grad():
        model.get_submodule("encoder.0").weight.view(-1)[0] = math.inf
    with pytest.raises(dwp.NonFinitePosteriorError, match=re.escape("'encoder.0'")):
        dwp.predict(model, x, n_samples=2, task="classification")
    # a loop that never reaches elbo/predict still hears of it, after a bounded delay
    monkeypatch.setattr(dwp.nn, "MAX_DEFERRED_CHECKS", 4)
    model(x)  # 2 queued
    with pytest.raises(dwp.NonFinitePosteriorError, match=re.escape("'encoder.0'")):
        model(x)  # 4: read in the forward pass
    dwp.set_validation(False)
    try:
        model(x)  # off: nothing queued
    finally:
        dwp.set_validation(True)
    assert not dwp.nn._deferred


# -- 6. KL is summed ------------------------------------------------------------------------
def _random_posterior(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.5, generator=g)
        layer.weight_log_sigma.uniform_(-4.0, 0.5, generator=g)
        if layer.bias is not None:
            layer.bias.normal_(0.0, 0.5, generator=g)
        if layer.bias_log_sigma is not None:
            layer.bias_log_sigma.uniform_(-4.0, 0.5, generator=g)
    return layer


def _closed_form_kl(loc, log_scale, p_loc=0.0, p_scale=1.0):
    return kl_divergence(Normal(loc, log_scale.exp()), Normal(p_loc, p_scale)).sum()


@pytest.mark.parametrize(
    ("make", "prior"),
    [
        (lambda p: dwp.BayesConv3d(2, 3, (3, 1, 2), prior=p), None),
        (lambda p: dwp.BayesLinear(7, 5, prior=p), None),
        (lambda p: dwp.BayesConvTranspose2d(2, 3, 3, prior=p), NormalPrior(0.2, 0.5)),
    ],
    ids=["conv3d-N01", "linear-N01", "convT2d-N(0.2,0.5)"],
)
def test_layer_kl_is_the_summed_closed_form(make, prior):
    layer = _random_posterior(make(prior))
    p_loc, p_scale = (0.0, 1.0) if prior is None else (0.2, 0.5)
    expected = _closed_form_kl(layer.weight, layer.weight_log_sigma, p_loc, p_scale)
    got = layer.kl()
    assert got.dim() == 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv3d"])
def test_kl_scales_with_the_number_of_weights(kind):
    # bayesian-torch averaged each layer's KL: a 1024x larger layer had the same KL
    if kind == "linear":
        small, big = dwp.BayesLinear(3, 2), dwp.BayesLinear(3, 2 * 1024)
    else:
        small, big = dwp.BayesConv3d(2, 1, 3), dwp.BayesConv3d(2, 1024, 3)
    _random_posterior(small)
    reps = (1024,) + (1,) * (small.weight.dim() - 1)
    with torch.no_grad():
        big.weight.copy_(small.weight.repeat(reps))
        big.weight_log_sigma.copy_(small.weight_log_sigma.repeat(reps))
    torch.testing.assert_close(big.kl(), 1024 * small.kl(), rtol=1e-5, atol=0)


def test_bayesian_bias_adds_its_own_kl_term():
    layer = _random_posterior(
        dwp.BayesConv2d(
            2, 3, 3, prior=NormalPrior(), bias_prior=NormalPrior(0.1, 2.0), bayesian_bias=True
        )
    )
    weight_kl = _closed_form_kl(layer.weight, layer.weight_log_sigma)
    bias_kl = _closed_form_kl(layer.bias, layer.bias_log_sigma, 0.1, 2.0)
    torch.testing.assert_close(layer.kl(), weight_kl + bias_kl, rtol=1e-5, atol=1e-5)
    # a deterministic bias has no KL term
    det = dwp.BayesConv2d(2, 3, 3)
    with torch.no_grad():
        det.weight.copy_(layer.weight)
        det.weight_log_sigma.copy_(layer.weight_log_sigma)
    torch.testing.assert_close(det.kl(), weight_kl, rtol=1e-5, atol=1e-5)


# -- 7. gradients -----------------------------------------------------------------------------
@pytest.mark.parametrize("bayesian_bias", [False, True], ids=["det-bias", "bayes-bias"])
@pytest.mark.parametrize("kind", ["conv2d", "convT3d", "linear"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradients_reach_every_posterior_parameter(estimator, kind, bayesian_bias):
    torch.manual_seed(0)
    opts = dict(bayesian_bias=bayesian_bias, estimator=estimator, init_log_sigma=-2.0)
    if kind == "conv2d":
        layer, x = dwp.BayesConv2d(2, 3, 3, **opts), torch.randn(2, 2, 5, 5)
    elif kind == "convT3d":
        layer, x = dwp.BayesConvTranspose3d(2, 3, 2, stride=2, **opts), torch.randn(2, 2, 2, 2, 2)
    else:
        layer, x = dwp.BayesLinear(4, 3, **opts), torch.randn(2, 4)
    layer.train()
    names = ["weight", "weight_log_sigma", "bias"] + (["bias_log_sigma"] if bayesian_bias else [])
    params = [getattr(layer, n) for n in names]

    # the data term alone reaches the scales through the sampled noise
    data_grads = torch.autograd.grad(layer(x).pow(2).sum(), params)
    for name, grad in zip(names, data_grads, strict=True):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name

    (layer(x).sum() + layer.kl()).backward()
    for name, p in zip(names, params, strict=True):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name

    # in mean mode the output does not depend on the scales
    with dwp.sampling(False):
        grads = torch.autograd.grad(layer(x).sum(), [layer.weight_log_sigma], allow_unused=True)
    assert grads[0] is None


# -- 8. state_dict ------------------------------------------------------------------------------
def _checkpoint_model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(
        OrderedDict(
            encoder=dwp.BayesConv2d(
                2, 3, 3, padding=1, prior=PretrainedNormalPrior(), bayesian_bias=True
            ),
            act=nn.ReLU(),
            flat=nn.Flatten(),
            head=dwp.BayesLinear(3 * 4 * 4, 2, prior=NormalPrior(0.0, 0.3)),
        )
    )
    for layer in _layers(model):
        with torch.no_grad():
            layer.weight_log_sigma.uniform_(-3.0, -1.0)
    return model


def test_state_dict_holds_posterior_and_prior_state():
    model = _checkpoint_model(0)
    sd = model.state_dict()
    expected = {
        "encoder.weight",
        "encoder.bias",
        "encoder.weight_log_sigma",
        "encoder.bias_log_sigma",
        "encoder.weight_prior.loc",
        "encoder.weight_prior._extra_state",
        "encoder.bias_prior.loc",
        "encoder.bias_prior.scale",
        "head.weight",
        "head.bias",
        "head.weight_log_sigma",
        "head.weight_prior.loc",
        "head.weight_prior.scale",
    }
    assert expected <= set(sd)
    # bayesian-torch dropped prior buffers: a reloaded MOPED centre silently reset
    assert torch.equal(sd["encoder.weight_prior.loc"], model.encoder.weight_prior.loc)
    assert sd["encoder.weight_prior.loc"].shape == model.encoder.weight.shape
    torch.testing.assert_close(sd["head.weight_prior.scale"], torch.tensor(0.3))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_state_dict_round_trip_reproduces_samples(estimator):
    source, target = _checkpoint_model(0), _checkpoint_model(1)
    dwp.set_estimator(source, estimator)
    dwp.set_estimator(target, estimator)
    x = torch.randn(3, 2, 4, 4)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer))

    torch.testing.assert_close(
        target.encoder.weight_prior.loc, source.encoder.weight_prior.loc, rtol=0, atol=0
    )
    assert not torch.equal(
        target.encoder.weight_prior.loc, _checkpoint_model(1).encoder.weight_prior.loc
    )
    torch.testing.assert_close(dwp.kl(target), dwp.kl(source), rtol=0, atol=0)
    for seed in range(3):
        torch.manual_seed(seed)
        expected = source(x)
        torch.manual_seed(seed)
        torch.testing.assert_close(target(x), expected, rtol=0, atol=0)


def test_loading_a_different_layer_shape_names_key_and_shapes():
    source = nn.Sequential(OrderedDict(encoder=dwp.BayesConv2d(2, 4, 3)))
    target = nn.Sequential(OrderedDict(encoder=dwp.BayesConv2d(2, 5, 3)))
    with pytest.raises(RuntimeError) as info:
        target.load_state_dict(source.state_dict())
    message = str(info.value)
    assert "encoder.weight:" in message and "encoder.weight_log_sigma:" in message
    assert str(torch.Size([4, 2, 3, 3])) in message and str(torch.Size([5, 2, 3, 3])) in message


@pytest.mark.parametrize(
    ("saved", "loaded"),
    [(NormalPrior, LogUniformPrior), (LogUniformPrior, NormalPrior)],
    ids=["normal-into-loguniform", "loguniform-into-normal"],
)
def test_loading_a_different_prior_type_raises(saved, loaded):
    source = nn.Sequential(OrderedDict(encoder=dwp.BayesConv2d(2, 4, 3, prior=saved())))
    target = nn.Sequential(OrderedDict(encoder=dwp.BayesConv2d(2, 4, 3, prior=loaded())))
    with pytest.raises(RuntimeError, match="prior mismatch") as info:
        target.load_state_dict(source.state_dict())
    assert "encoder" in str(info.value)
    assert isinstance(target.encoder.weight_prior, loaded)


# -- 9. initial posterior scale ----------------------------------------------------------------
def test_fan_in_init_scales_the_noise_with_the_layer():
    """The weight noise is the same fraction of the pre-activation spread in a narrow and a
    wide layer: sigma * sqrt(fan_in / 2) = 0.1 (a constant log-sigma would not do that)."""
    for layer in (dwp.BayesConv3d(16, 8, 3), dwp.BayesConv3d(64, 8, 3), dwp.BayesLinear(10, 2)):
        fan_in = layer.weight[0].numel()
        relative = layer.weight_posterior.scale * math.sqrt(fan_in / 2)
        torch.testing.assert_close(relative, torch.full_like(relative, 0.1))
    with pytest.raises(ValueError, match="init_log_sigma must be a number or 'fan_in'"):
        dwp.BayesLinear(2, 2, init_log_sigma="he")
    with pytest.raises(ValueError, match="finite"):
        dwp.BayesLinear(2, 2, init_log_sigma=float("nan"))


@pytest.mark.parametrize("cls", BAYES_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("init_log_sigma", [None, "fan_in", -3.0])
def test_init_log_sigma_and_reset_parameters(cls, init_log_sigma):
    args = (4, 6) if cls is dwp.BayesLinear else (4, 6, 3)
    kwargs = {} if init_log_sigma is None else {"init_log_sigma": init_log_sigma}
    layer = cls(*args, bayesian_bias=True, **kwargs)
    # the default: a tenth of the He standard deviation, from the fan-in torch counts
    fan_in = nn.init._calculate_fan_in_and_fan_out(layer.weight)[0]
    he_tenth = math.log(0.1 * math.sqrt(2.0 / fan_in))
    expected = he_tenth if init_log_sigma in (None, "fan_in") else init_log_sigma
    # a plain float setting, not a trainable parameter or buffer
    assert isinstance(layer.init_log_sigma, float) and layer.init_log_sigma == expected
    assert not any("init_log_sigma" in key for key in layer.state_dict())
    for scale in (layer.weight_posterior.scale, layer.bias_posterior.scale):
        torch.testing.assert_close(scale, torch.full_like(scale, math.exp(expected)))
    # trainable leaves, not the output of an autograd graph
    for p in (layer.weight_log_sigma, layer.bias_log_sigma):
        assert isinstance(p, nn.Parameter) and p.requires_grad and p.is_leaf and p.grad_fn is None

    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(7.0)
    weight_log_sigma = layer.weight_log_sigma
    layer.reset_parameters()
    assert layer.weight_log_sigma is weight_log_sigma  # in place: optimisers keep tracking it
    torch.testing.assert_close(
        layer.weight_log_sigma, torch.full_like(layer.weight_log_sigma, expected)
    )
    torch.testing.assert_close(
        layer.bias_log_sigma, torch.full_like(layer.bias_log_sigma, expected)
    )
    # the mean gets the torch twin's initialisation again (bounded far below 7)
    assert layer.weight.abs().max() < 1.0 and layer.bias.abs().max() < 1.0
