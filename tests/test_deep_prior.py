"""The deep weight prior (:class:`dwp.DeepWeightPrior`): its KL bound, gradients, errors,
files, DWP initialisation and Pyro interop.

The bound's exactness is checked on a linear-Gaussian "VAE" written in closed form:
p(z) = N(0, I_d), p(w | z) = N(A z + b, s^2 I), with A of orthogonal columns, so that the
prior marginal is p(w) = N(b, A A^T + s^2 I) per kernel slice and the exact posterior
p(z | w) = N(M (w - b), S), S = (I + A^T A / s^2)^-1, M = S A^T / s^2, is diagonal: an
encoder returning it makes the auxiliary bound

    KL(q || p) <= -H(q) + E_q(w)[KL(r(z | w) || p(z)) - E_r(z | w) log p(w | z)]

an equality, so its Monte Carlo mean must match the closed-form KL(q || p) within a few
standard errors (estimated from the evaluations themselves), while a worse encoder must
overshoot it.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections import OrderedDict

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from torch import nn
from torch.distributions import MultivariateNormal, kl_divergence

import dwp
from dwp.likelihoods import gaussian_nll
from dwp.posterior import MeanFieldNormal, reparam_sample
from dwp.priors import DeepWeightPrior, DeepWeightSitePrior, KLKind, PriorFileError
from dwp.priors import deep as deep_module
from dwp.pyro import PriorDistribution, PyroBNN, prior_distribution
from dwp.vae import KernelVAE, fit_kernel_vae

KS = (3, 3)  # kernel slice of the linear-Gaussian tests
K, D, S = 9, 2, 0.05  # kernel size, latent size, decoder noise


def _linear_gaussian():
    """A (K x D, orthogonal columns of norms 0.3 and 0.15) and b, float64."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(K, D, generator=g, dtype=torch.float64))
    return q * torch.tensor([0.3, 0.15], dtype=torch.float64), 0.1 * torch.randn(
        K, generator=g, dtype=torch.float64
    )


A, B = _linear_gaussian()
SIGMA = A @ A.T + S**2 * torch.eye(K, dtype=torch.float64)  # Cov p(w)
POST_VAR = 1.0 / (1.0 + (A * A).sum(0) / S**2)  # diag S: A^T A is diagonal
POST_MAP = POST_VAR[:, None] * A.T / S**2  # M


class _LinearEncoder(nn.Module):
    def __init__(self, m: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.m, self.b = nn.Parameter(m.clone()), nn.Parameter(b.clone())
        self.log_scale = nn.Parameter(scale.log())

    def forward(self, w):
        loc = (w.flatten(1) - self.b) @ self.m.T
        return loc, self.log_scale.exp().expand_as(loc)


class _LinearDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(A.clone()), nn.Parameter(B.clone())
        self.log_s = nn.Parameter(torch.tensor(math.log(S), dtype=torch.float64))

    def forward(self, z):
        loc = z @ self.a.T + self.b
        return loc.reshape(-1, *KS), self.log_s.exp().expand_as(loc).reshape(-1, *KS)


class LinearGaussianVAE(KernelVAE):
    """The closed-form VAE; ``m_factor`` / ``scale_factor`` != 1 make the encoder worse."""

    def __init__(self, m_factor: float = 1.0, scale_factor: float = 1.0) -> None:
        super().__init__(KS, latent_dim=D, hidden=1)  # attributes and config()
        self.encoder = _LinearEncoder(POST_MAP * m_factor, B, POST_VAR.sqrt() * scale_factor)
        self.decoder = _LinearDecoder()


def exact_kl(q: MeanFieldNormal) -> float:
    """KL(q || N(b, Sigma)) summed over the kernel slices, in closed form."""
    loc, var = q.loc.reshape(-1, K).double(), q.scale.reshape(-1, K).double() ** 2
    return kl_divergence(MultivariateNormal(loc, torch.diag_embed(var)), _marginal()).sum().item()


def _marginal() -> MultivariateNormal:
    return MultivariateNormal(B, SIGMA)


def _posterior(shape=(8, 4, 3, 3), seed=1, name="conv.weight", dtype=torch.float64):
    """A posterior over ``shape``'s 3x3 slices, near the prior's typical set."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape) // K
    z = torch.randn(n, D, generator=g, dtype=torch.float64)
    loc = z @ A.T + B + 0.05 * torch.randn(n, K, generator=g, dtype=torch.float64)
    log_scale = torch.empty(n, K, dtype=torch.float64).uniform_(
        math.log(0.01), math.log(0.05), generator=g
    )
    return MeanFieldNormal(
        loc.reshape(shape).to(dtype), log_scale.reshape(shape).to(dtype), name, len(KS)
    )


def _mc(fn, n: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean, standard error and variance of ``n`` evaluations of ``fn()``."""
    torch.manual_seed(seed)
    with torch.no_grad():
        values = torch.stack([fn().detach().double() for _ in range(n)])
    var = values.var().item()
    return values.mean().item(), math.sqrt(var / n), var


def _site(prior: DeepWeightPrior, q: MeanFieldNormal) -> DeepWeightSitePrior:
    return prior.for_site(q.name, q.loc, q.kernel_dims)


# -- 1. exactness of the bound ------------------------------------------------------------
def test_bound_equals_the_exact_kl_with_the_exact_encoder():
    q = _posterior()
    prior = DeepWeightPrior({"g": LinearGaussianVAE()})
    site = _site(prior, q)
    assert prior.kl_kind is KLKind.UPPER_BOUND and site.is_bound
    kl = exact_kl(q)  # 379.59 nats over 32 slices
    mean, se, _ = _mc(lambda: site.kl(q), 2000)
    # measured: 379.26 +- 0.25 (-1.3 SE from the truth); a bound missing the entropy term
    # or the KL(r || p(z)) term would be off by hundreds of SE
    assert abs(mean - kl) < 5 * se
    # the template's kl binds to the posterior's layer first: same value, same draws
    torch.manual_seed(5)
    via_template = prior.kl(q)
    torch.manual_seed(5)
    torch.testing.assert_close(via_template, site.kl(q))


@pytest.mark.parametrize(
    ("m_factor", "scale_factor"), [(0.8, 1.0), (1.0, 1.5), (1.0, 0.5), (0.8, 1.5)]
)
def test_bound_is_loose_with_a_worse_encoder(m_factor, scale_factor):
    q = _posterior()
    site = _site(DeepWeightPrior({"g": LinearGaussianVAE(m_factor, scale_factor)}), q)
    mean, se, _ = _mc(lambda: site.kl(q), 500)
    # the excess is E_q KL(r || p(z | w)) > 0: measured 19 to 54 SE for these four
    assert mean > exact_kl(q) + 5 * se


def test_training_the_encoder_tightens_the_bound():
    q = _posterior()
    prior = DeepWeightPrior({"g": LinearGaussianVAE(0.8, 1.5)})
    site = _site(prior, q)
    kl = exact_kl(q)
    before, se_before, _ = _mc(lambda: site.kl(q), 500)
    encoder = prior.vaes["g"].encoder
    decoder_state = copy.deepcopy(prior.vaes["g"].decoder.state_dict())
    optimiser = torch.optim.Adam(encoder.parameters(), lr=0.02)
    torch.manual_seed(3)
    for _ in range(300):
        optimiser.zero_grad()
        site.kl(q).backward()
        optimiser.step()
    after, se_after, _ = _mc(lambda: site.kl(q), 500, seed=1)
    # measured: 430.1 +- 1.0 before, 379.6 +- 0.5 after, exact 379.6
    assert before > kl + 5 * se_before
    assert abs(after - kl) < abs(before - kl) - 5 * math.hypot(se_before, se_after)
    assert after >= kl - 5 * se_after
    assert all(
        torch.equal(v, decoder_state[k]) for k, v in prior.vaes["g"].decoder.state_dict().items()
    )
    # the trained encoder approaches the exact posterior map
    torch.testing.assert_close(encoder.log_scale.exp(), POST_VAR.sqrt(), rtol=0.15, atol=0)


# -- 2. gradients and who trains what -------------------------------------------------------
def _conv3d_net():
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            enc1=nn.Conv3d(1, 3, 3, padding=1),
            act1=nn.ReLU(),
            enc2=nn.Conv3d(3, 3, 3, padding=1),
            act2=nn.ReLU(),
            dec1=nn.Conv3d(3, 2, 3, padding=1),
            proj=nn.Conv3d(2, 2, 1),
            flat=nn.Flatten(),
            head=nn.Linear(2 * 4**3, 3),
        )
    )


def _vae(kernel_shape=(3, 3, 3), seed=0, hidden=16):
    torch.manual_seed(seed)
    return KernelVAE(kernel_shape, hidden=hidden)


KERNEL3 = ["enc1", "enc2", "dec1"]


def _ids(tensors):
    return {id(t) for t in tensors}


@pytest.mark.parametrize("train_encoder", [True, False])
def test_gradients_reach_posterior_and_encoder_never_decoder(train_encoder):
    vae = _vae()
    original = copy.deepcopy(vae.state_dict())
    prior = DeepWeightPrior({"g": vae}, train_encoder=train_encoder)
    net = dwp.bayesianize(_conv3d_net(), prior, include=KERNEL3, init_log_sigma=-3.0)
    shared = getattr(net, KERNEL3[0]).weight_prior.vae  # the model's own copy of the VAE
    assert shared is not prior.vaes["g"]
    assert all(getattr(net, n).weight_prior.vae is shared for n in KERNEL3)
    decoder = list(shared.decoder.buffers())
    encoder = list(shared.encoder.parameters()) or list(shared.encoder.buffers())
    assert len(decoder) == len(list(vae.decoder.parameters())) > 0
    params = _ids(net.parameters())
    grouped = _ids(p for group in dwp.param_groups(net, lr=1e-3) for p in group["params"])
    buffers = _ids(net.buffers())
    assert not _ids(decoder) & (params | grouped) and _ids(decoder) <= buffers
    assert all(not t.requires_grad for t in decoder)
    if train_encoder:
        assert _ids(encoder) <= params and _ids(encoder) <= grouped
    else:
        assert not list(shared.encoder.parameters())
        assert not _ids(encoder) & (params | grouped) and _ids(encoder) <= buffers

    torch.manual_seed(0)
    dwp.kl(net).backward()
    for name in KERNEL3:
        layer = getattr(net, name)
        for p in (layer.weight, layer.weight_log_sigma):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    for t in encoder:
        if train_encoder:
            assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
        else:
            assert t.grad is None
    assert all(t.grad is None for t in decoder)

    # an optimiser step on the network trains the prior's encoder copy, never the VAE that
    # was passed in (still a plain trainable VAE) nor the decoder
    decoder_before = [t.clone() for t in decoder]
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert all(torch.equal(a, b) for a, b in zip(decoder, decoder_before, strict=True))
    assert all(p.requires_grad for p in vae.parameters())
    assert len(list(vae.decoder.parameters())) == len(decoder)
    assert all(torch.equal(v, original[k]) for k, v in vae.state_dict().items())
    changed = not all(torch.equal(v, original[k]) for k, v in shared.state_dict().items())
    assert changed is train_encoder


def _posterior_grads(net, seed=0):
    net.zero_grad()
    torch.manual_seed(seed)
    dwp.kl(net).backward()
    return [getattr(net, n).weight.grad.clone() for n in KERNEL3]


def test_frozen_encoder_still_carries_the_posterior_gradient():
    # Freezing the encoder stops its training, not the gradient path w -> r(z | w) -> bound:
    # the posterior's gradient is the same as with a trainable encoder (same draws), and it
    # changes when the encoder's input is detached (so that path contributes).
    nets = [
        dwp.bayesianize(
            _conv3d_net(), DeepWeightPrior({"g": _vae()}, train_encoder=t), include=KERNEL3
        )
        for t in (True, False)
    ]
    trainable, frozen = (_posterior_grads(net) for net in nets)
    for a, b in zip(trainable, frozen, strict=True):
        torch.testing.assert_close(a, b)
    encoder = nets[1].enc1.weight_prior.vae.encoder
    forward = encoder.forward
    encoder.forward = lambda w: forward(w.detach())
    detached = _posterior_grads(nets[1])
    assert not any(torch.allclose(a, b) for a, b in zip(frozen, detached, strict=True))


# -- 3. chunking and the number of samples --------------------------------------------------
def test_chunked_estimate_replays_the_unchunked_one_chunk_by_chunk():
    # With chunk_size=7 the 20 slices are bounded in chunks of 7, 7, 6, each under
    # activation checkpointing.  Under one seed, that is exactly the sum of unchunked bounds
    # of the three chunk posteriors (same draws in the same order); the gradients agree too,
    # which they would not if the backward pass re-ran the VAE with fresh draws.
    vae = _vae((3, 3))
    chunked = DeepWeightPrior({"g": vae}, chunk_size=7)
    whole = DeepWeightPrior({"g": vae})
    q0 = _posterior((5, 4, 3, 3), dtype=torch.float32)
    leaves = [q0.loc.clone().requires_grad_(), q0.log_scale.clone().requires_grad_()]

    def grads(value):
        return torch.autograd.grad(value, leaves)

    q = MeanFieldNormal(*leaves, "conv.weight", 2)
    torch.manual_seed(0)
    value = _site(chunked, q).kl(q)
    expected_grads = grads(value)
    torch.manual_seed(0)
    site = _site(whole, q)
    parts = [
        site.kl(MeanFieldNormal(loc, log_scale, "conv.weight", 2))
        for loc, log_scale in zip(
            leaves[0].reshape(-1, *KS).split(7), leaves[1].reshape(-1, *KS).split(7), strict=True
        )
    ]
    reference = torch.stack(parts).sum()
    torch.testing.assert_close(value, reference)
    for got, want in zip(expected_grads, grads(reference), strict=True):
        torch.testing.assert_close(got, want)


def test_chunked_and_unchunked_agree_in_expectation():
    q0 = _posterior((5, 4, 3, 3))
    results = {}
    for chunk_size in (7, None):
        prior = DeepWeightPrior({"g": LinearGaussianVAE()}, chunk_size=chunk_size)
        loc = q0.loc.clone().requires_grad_()
        q = MeanFieldNormal(loc, q0.log_scale, q0.name, 2)
        site = _site(prior, q)
        torch.manual_seed(0 if chunk_size else 1)
        values, grads = [], []
        for _ in range(300):
            value = site.kl(q)
            values.append(value.detach())
            grads.append(torch.autograd.grad(value, loc)[0])
        results[chunk_size] = torch.stack(values), torch.stack(grads)
    (v1, g1), (v2, g2) = results[7], results[None]
    se = math.sqrt(v1.var() / len(v1) + v2.var() / len(v2))
    assert abs(v1.mean() - v2.mean()) < 5 * se
    assert abs(v2.mean() - exact_kl(q0)) < 5 * math.sqrt(v2.var() / len(v2))
    # the mean gradient, element by element (180 elements: a 5-SE excursion has probability
    # ~1e-4 under equality); the replay test above checks chunked gradients draw for draw,
    # this one that chunking leaves the gradient estimator's expectation alone
    se_grad = (g1.var(0) / len(g1) + g2.var(0) / len(g2)).sqrt()
    assert ((g1.mean(0) - g2.mean(0)).abs() < 5 * se_grad).all()


def test_more_samples_reduce_the_variance():
    q = _posterior()
    variances = {}
    for n_samples in (1, 4):
        site = _site(DeepWeightPrior({"g": LinearGaussianVAE()}, n_samples=n_samples), q)
        mean, se, variances[n_samples] = _mc(lambda site=site: site.kl(q), 400)
        assert abs(mean - exact_kl(q)) < 5 * se  # still unbiased
    # -H(q) is constant, the rest an average of n independent draws: ratio 1/4 (measured
    # 0.22); the log of a 400-sample variance ratio has SE ~0.1, so 0.5 is > 6 SE away
    assert variances[4] / variances[1] < 0.5


def _linear_net(**options):
    """Two 3x3 conv layers of one group under the exact VAE, posteriors near the prior."""
    torch.manual_seed(0)
    plain = nn.Sequential(
        OrderedDict(c1=nn.Conv2d(4, 8, 3), act=nn.Tanh(), c2=nn.Conv2d(8, 2, 3))
    ).double()
    prior = DeepWeightPrior({"g": LinearGaussianVAE()}, **options)
    net = dwp.bayesianize(plain, prior)
    kl = 0.0
    for seed, layer in enumerate((net.c1, net.c2)):
        q = _posterior(tuple(layer.weight.shape), seed=10 + seed)
        with torch.no_grad():
            layer.weight.copy_(q.loc)
            layer.weight_log_sigma.copy_(q.log_scale)
        kl += exact_kl(q)
    return net, kl


@pytest.mark.parametrize("join", ["small", "none", "all"])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_network_kl_batches_a_group_and_stays_exact(chunk_size, join, monkeypatch):
    # dwp.kl evaluates both layers of the group in one pass of the VAE (with chunk_size=7
    # the chunks straddle the two layers' 32 + 16 slices); dwp.kl_per_site layer by layer.
    # With the exact encoder both equal the closed-form KL summed over the layers.
    # "none": every layer counts as large (one call each, as large layers on a CPU);
    # "all": every layer joins, as on an accelerator.
    if join == "none":
        monkeypatch.setattr(deep_module, "_BATCH_BELOW", 0)
    if join == "all":
        monkeypatch.setattr(deep_module, "_BATCH_BELOW", 0)
        monkeypatch.setattr(deep_module, "_joins_every_layer", lambda device: True)
    net, kl = _linear_net(chunk_size=chunk_size)
    batched, se_batched, _ = _mc(lambda: dwp.kl(net), 400)
    per_site, se_per_site, _ = _mc(lambda: sum(dwp.kl_per_site(net).values()), 400, seed=1)
    assert abs(batched - kl) < 5 * se_batched
    assert abs(per_site - kl) < 5 * se_per_site
    dwp.kl(net).backward()  # one graph through the shared VAE reaches both layers
    assert all(layer.weight.grad.abs().sum() > 0 for layer in (net.c1, net.c2))


# -- 4. errors -----------------------------------------------------------------------------
def _shape(t):
    return re.escape(str(tuple(t)))


@pytest.mark.parametrize(
    ("kernel_shape", "layer", "layer_shape", "extra"),
    [
        ((3, 3), "enc1", (3, 1, 3, 3, 3), ""),
        ((3, 3, 3), "head", (3, 128), "dense weight has no spatial kernels"),
        ((3, 3, 3), "proj", (2, 2, 1, 1, 1), ""),
    ],
)
def test_kernel_shape_mismatch_names_layer_and_shapes(kernel_shape, layer, layer_shape, extra):
    prior = DeepWeightPrior({"g": _vae(kernel_shape, hidden=4)})
    pattern = rf"'{layer}\.weight'.*{_shape(kernel_shape)}.*{_shape(layer_shape)}.*{extra}"
    with pytest.raises(dwp.PriorMismatchError, match=pattern):
        dwp.bayesianize(_conv3d_net(), prior, include=[layer])
    with pytest.raises(dwp.PriorMismatchError, match=pattern):
        dwp.init_from_prior_(_conv3d_net(), prior, include=[layer])


def test_site_kl_checks_the_posterior_shape():
    site = DeepWeightPrior({"g": _vae((3, 3), hidden=4)}).for_site(
        "c.weight", torch.zeros(2, 2, 3, 3), 2
    )
    wrong = MeanFieldNormal(torch.zeros(2, 2, 5, 5), torch.zeros(2, 2, 5, 5), "c2.weight", 2)
    with pytest.raises(dwp.PriorMismatchError, match=r"'c2\.weight'.*\(3, 3\).*\(2, 2, 5, 5\)"):
        site.kl(wrong)


def test_missing_group_names_layer_and_lists_groups():
    prior = DeepWeightPrior(
        {"enc": _vae(hidden=4), "dec": _vae(hidden=4)}, layer_groups={"enc1": "enc"}
    )
    with pytest.raises(dwp.PriorMismatchError, match=r"'enc2'.*\['enc', 'dec'\]"):
        dwp.bayesianize(_conv3d_net(), prior, include=["enc1", "enc2"])
    wrong = DeepWeightPrior({"enc": _vae(hidden=4)}, layer_groups=lambda name: "bottleneck")
    with pytest.raises(dwp.PriorMismatchError, match=r"'enc1'.*'bottleneck' is not one.*\['enc'\]"):
        dwp.bayesianize(_conv3d_net(), wrong, include=["enc1"])
    with pytest.raises(ValueError, match="for_site"):
        prior.sample((3, 1, 3, 3, 3))  # several groups: which one?


@pytest.mark.parametrize(
    "layer_groups",
    [{"enc*": "enc", "dec*": "dec"}, lambda name: "enc" if name.startswith("enc") else "dec"],
    ids=["glob", "callable"],
)
def test_layer_groups_by_glob_or_callable(layer_groups):
    prior = DeepWeightPrior({"enc": _vae(seed=0), "dec": _vae(seed=1)}, layer_groups=layer_groups)
    net = dwp.bayesianize(_conv3d_net(), prior, include=KERNEL3)
    groups = {n: getattr(net, n).weight_prior.group for n in KERNEL3}
    assert groups == {"enc1": "enc", "enc2": "enc", "dec1": "dec"}
    for name, group in groups.items():  # the model's copies, one per group
        vae = getattr(net, name).weight_prior.vae
        assert vae is not prior.vaes[group]
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                vae.state_dict().values(), prior.vaes[group].state_dict().values(), strict=True
            )
        )
    assert net.enc1.weight_prior.vae is net.enc2.weight_prior.vae
    assert prior.group_of("enc.9") == "enc" and prior.group_of("dec7") == "dec"


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="at least one VAE"):
        DeepWeightPrior({})
    with pytest.raises(ValueError, match=r"n_samples.*>= 1.*0"):
        DeepWeightPrior({"g": _vae(hidden=4)}, n_samples=0)
    with pytest.raises(ValueError, match=r"chunk_size.*>= 1"):
        DeepWeightPrior({"g": _vae(hidden=4)}, chunk_size=0)


# -- 5. saving and loading ----------------------------------------------------------------
def _two_group_prior(**options):
    return DeepWeightPrior(
        {"enc": _vae(seed=0, hidden=8), "dec": _vae(seed=1, hidden=8)},
        layer_groups={"enc*": "enc", "dec1": "dec"},
        metadata={"source": "test", "kernels": {"enc": 123, "dec": 45}},
        **options,
    )


def _weight_posterior(shape=(3, 2, 3, 3, 3), name="enc1.weight"):
    g = torch.Generator().manual_seed(0)
    return MeanFieldNormal(
        0.2 * torch.randn(shape, generator=g), torch.full(shape, -3.0), name, kernel_dims=3
    )


@pytest.mark.parametrize("train_encoder", [True, False])
def test_save_load_round_trip(tmp_path, train_encoder):
    prior = _two_group_prior(chunk_size=5, train_encoder=train_encoder)
    path = tmp_path / "prior.pt"
    prior.save(path)
    assert os.listdir(tmp_path) == ["prior.pt"]  # written via a temporary file, renamed
    loaded = DeepWeightPrior.load(path)
    assert loaded.groups == ["enc", "dec"]
    assert loaded.layer_groups == {"enc*": "enc", "dec1": "dec"}
    assert loaded.metadata == {"source": "test", "kernels": {"enc": 123, "dec": 45}}
    assert (loaded.n_samples, loaded.chunk_size, loaded.train_encoder) == (1, 5, train_encoder)
    assert bool(list(loaded.vaes["enc"].encoder.parameters())) is train_encoder
    assert not list(loaded.vaes["enc"].decoder.parameters())
    for name in ("enc1.weight", "dec1.weight"):
        q = _weight_posterior(name=name)
        torch.manual_seed(0)
        want = _site(prior, q).kl(q)
        torch.manual_seed(0)
        got = _site(loaded, q).kl(q)
        torch.testing.assert_close(got, want)
    # the two groups hold different VAEs, so the check above can tell them apart
    q = _weight_posterior()
    torch.manual_seed(0)
    other = prior.for_site("dec1.weight", q.loc, 3).kl(q)
    torch.manual_seed(0)
    assert not torch.allclose(other, _site(loaded, q).kl(q))

    overridden = DeepWeightPrior.load(path, n_samples=2, chunk_size=None)
    assert (overridden.n_samples, overridden.chunk_size) == (2, None)
    site = _site(overridden, q)
    assert (site.n_samples, site.chunk_size) == (2, None)


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "prior.pt"
    _two_group_prior().save(path)
    good = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _two_group_prior(n_samples=3).save(path)
    assert os.listdir(tmp_path) == ["prior.pt"] and path.read_bytes() == good
    monkeypatch.undo()
    assert DeepWeightPrior.load(path).n_samples == 1


def test_prior_with_function_groups_cannot_be_saved(tmp_path):
    prior = DeepWeightPrior({"g": _vae(hidden=4)}, layer_groups=lambda name: "g")
    with pytest.raises(ValueError, match="function"):
        prior.save(tmp_path / "prior.pt")
    assert os.listdir(tmp_path) == []


def _corrupt(kind, path):
    if kind == "text":
        path.write_text("this is not a prior\n")
        return
    if kind == "other_dict":
        torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, path)
        return
    if kind == "list":
        torch.save([torch.ones(2)], path)
        return
    _two_group_prior().save(path)
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return
    payload = torch.load(path, weights_only=True)
    if kind == "wrong_shape":
        state = payload["groups"]["dec"]["state_dict"]
        key = next(iter(state))
        state[key] = torch.zeros(2, 2)
    elif kind == "unknown_group":
        payload["layer_groups"]["enc2"] = "bottleneck"
    elif kind == "bad_config":
        payload["groups"]["enc"]["config"]["kernel_shape"] = [3, 3]
    elif kind == "missing_key":
        del payload["options"]
    elif kind == "future_version":
        payload["format_version"] = 99
    elif kind == "groups_not_a_mapping":
        payload["groups"] = [payload["groups"]["enc"]]
    elif kind == "layer_groups_not_a_mapping":
        payload["layer_groups"] = None
    elif kind == "invalid_options":
        payload["options"]["n_samples"] = 0
    torch.save(payload, path)


@pytest.mark.parametrize(
    "kind",
    [
        "truncated",
        "text",
        "other_dict",
        "list",
        "wrong_shape",
        "unknown_group",
        "bad_config",
        "missing_key",
        "future_version",
        "groups_not_a_mapping",
        "layer_groups_not_a_mapping",
        "invalid_options",
    ],
)
def test_bad_prior_files_raise_prior_file_error_naming_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    _corrupt(kind, path)
    with pytest.raises(PriorFileError, match=re.escape(str(path))):
        DeepWeightPrior.load(path)
    assert issubclass(PriorFileError, ValueError) and dwp.PriorFileError is PriorFileError


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        DeepWeightPrior.load(tmp_path / "nowhere.pt")


def test_model_state_dict_round_trips_with_a_prior_from_file(tmp_path):
    path = tmp_path / "prior.pt"
    _two_group_prior().save(path)
    x = torch.randn(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))

    def build():
        net = dwp.bayesianize(
            _conv3d_net(), DeepWeightPrior.load(path), include=KERNEL3, init_log_sigma=-3.0
        )
        return dwp.set_mode(net, "sample")

    trained = build()
    optimiser = torch.optim.Adam(trained.parameters(), lr=1e-2)
    for step in range(3):  # moves means, scales and both groups' encoders
        optimiser.zero_grad()
        torch.manual_seed(step)
        (dwp.kl(trained) + trained(x).square().sum()).backward()
        optimiser.step()

    def outputs(net):
        torch.manual_seed(7)
        out = net(x)
        torch.manual_seed(7)
        return out, dwp.kl(net)

    fresh = build()
    out_before, kl_before = outputs(fresh)
    out_trained, kl_trained = outputs(trained)
    assert not torch.allclose(out_before, out_trained) and not torch.allclose(kl_before, kl_trained)
    fresh.load_state_dict(trained.state_dict())
    out_loaded, kl_loaded = outputs(fresh)
    assert torch.equal(out_loaded, out_trained)
    torch.testing.assert_close(kl_loaded, kl_trained)  # the trained encoders came along


def test_checkpoint_of_another_prior_kind_is_rejected_naming_the_layer():
    normal = dwp.bayesianize(_conv3d_net(), dwp.NormalPrior(), include=KERNEL3)
    deep = dwp.bayesianize(_conv3d_net(), DeepWeightPrior({"g": _vae(hidden=8)}), include=KERNEL3)
    with pytest.raises(RuntimeError, match=r"enc1\.weight_prior.*NormalPrior.*DeepWeightSitePrior"):
        deep.load_state_dict(normal.state_dict(), strict=False)


def test_checkpoint_with_other_vae_groups_is_rejected():
    # The site prior saves its group and VAE configuration as extra state ("validated
    # state": a checkpoint's VAE must have the same configuration).  Here enc2 had its own
    # VAE "b" in the checkpoint; in the model it shares "a" with enc1, so loading would
    # silently overwrite enc1's VAE with enc2's: it must fail naming the layer.
    def build(groups):
        vaes = {"a": _vae(seed=0, hidden=8), "b": _vae(seed=1, hidden=8)}
        return dwp.bayesianize(
            _conv3d_net(), DeepWeightPrior(vaes, layer_groups=groups), include=KERNEL3
        )

    saved = build({"enc1": "a", "enc2": "b", "dec1": "b"}).state_dict()
    with pytest.raises(RuntimeError, match=r"enc2\.weight_prior.*group"):
        build({"*": "a"}).load_state_dict(saved)


def test_checkpoint_with_another_vae_configuration_is_rejected():
    # same parameter shapes, another decoder floor: the tensors would load, the prior would not
    # be the one the checkpoint was trained with
    def build(min_scale):
        torch.manual_seed(0)
        vae = KernelVAE((3, 3, 3), hidden=8, min_scale=min_scale)
        return dwp.bayesianize(_conv3d_net(), DeepWeightPrior({"g": vae}), include=KERNEL3)

    with pytest.raises(RuntimeError, match=r"enc1\.weight_prior.*min_scale"):
        build(0.5).load_state_dict(build(1e-3).state_dict())


# -- 6. DWP initialisation ------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted_vae():
    """A VAE fitted on 3000 linear-Gaussian 3x3 kernels (held-out ELBO 9.9 nats/kernel,
    true log-likelihood ~11.2, full-covariance Gaussian 11.4, diagonal 8.2)."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3000, D, generator=g, dtype=torch.float64)
    bank = (z @ A.T + B + S * torch.randn(3000, K, generator=g, dtype=torch.float64)).float()
    fit = fit_kernel_vae(
        bank.reshape(-1, *KS), latent_dim=D, hidden=32, epochs=15, batch_size=256, lr=3e-3,
        progress=False,
    )  # fmt: skip
    return fit


def _conv2d_net():
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            c1=nn.Conv2d(8, 8, 3),
            act=nn.ReLU(),
            c2=nn.Conv2d(8, 8, 3),
            flat=nn.Flatten(),
            head=nn.Linear(8, 2),
        )
    )


def _mean_elbo(vae, weight):
    torch.manual_seed(0)
    with torch.no_grad():
        return vae.elbo(weight.detach().reshape(-1, *KS), n_samples=8).mean().item()


def test_dwp_initialisation_draws_kernels_the_vae_likes(fitted_vae):
    vae = fitted_vae.vae
    prior = DeepWeightPrior({"g": vae})
    he = _conv2d_net()
    for name in ("c1", "c2"):
        nn.init.kaiming_normal_(getattr(he, name).weight)
    plain = _conv2d_net()
    biases = [plain.c1.bias.clone(), plain.head.weight.clone()]
    torch.manual_seed(1)
    dwp.init_from_prior_(plain, prior, include=["c1", "c2"])
    assert torch.equal(plain.c1.bias, biases[0]) and torch.equal(plain.head.weight, biases[1])
    torch.manual_seed(2)
    bayes = dwp.bayesianize(_conv2d_net(), prior, init="prior", include=["c1", "c2"])
    # measured ELBO per kernel: prior samples 9.7, He kernels -17.5 / -14.5 (torch's default
    # init 4.4 / 4.9), held-out bank kernels 9.9
    for name in ("c1", "c2"):
        he_score = _mean_elbo(vae, getattr(he, name).weight)
        for net in (plain, bayes):
            score = _mean_elbo(vae, getattr(net, name).weight)
            assert score > he_score + 10.0
            assert score == pytest.approx(fitted_vae.best_val_elbo, abs=2.0)
    # different seeds, different draws; the exact p(w) agrees that they are typical kernels
    assert not torch.equal(plain.c1.weight, bayes.c1.weight)
    assert prior.sample((8, 8, 3, 3)).shape == (8, 8, 3, 3)
    # on a Bayesian network: the posterior means are overwritten, the scales kept
    pretrained = dwp.bayesianize(he, prior, include=["c1"], init_log_sigma=-4.0)
    dwp.init_from_prior_(pretrained, prior, include=["c1"])
    assert _mean_elbo(vae, pretrained.c1.weight) > _mean_elbo(vae, he.c1.weight) + 10.0
    assert (pretrained.c1.weight_log_sigma == -4.0).all()
    real = _marginal().sample((2000,)).flatten(1)
    typical = _marginal().log_prob(real).mean().item()
    drawn = _marginal().log_prob(bayes.c1.weight.detach().reshape(-1, K).double()).mean()
    assert drawn.item() > typical - 8.0  # measured 3.9 nats below; He kernels 43 below


def test_init_from_prior_rejects_a_mismatching_layer():
    prior = DeepWeightPrior({"g": _vae((3, 3), hidden=4)})
    net = _conv3d_net()
    before = net.enc1.weight.clone()
    with pytest.raises(dwp.PriorMismatchError, match=r"'enc1\.weight'.*\(3, 3\)"):
        dwp.init_from_prior_(net, prior, include=["enc1"])
    assert torch.equal(net.enc1.weight, before)


# -- 7. Pyro interop -------------------------------------------------------------------------
def test_prior_distribution_kl_and_log_prob_match_the_site_prior():
    prior = DeepWeightPrior({"enc": _vae(seed=0, hidden=8), "dec": _vae(seed=1, hidden=8)},
                            layer_groups={"enc*": "enc", "dec*": "dec"})  # fmt: skip
    q = _weight_posterior(name="dec1.weight")
    p = prior_distribution(prior, q.loc, "dec1.weight", kernel_dims=3)
    assert isinstance(p, PriorDistribution) and p.event_shape == q.shape
    assert isinstance(p.prior, DeepWeightSitePrior) and p.prior.group == "dec"
    guide = dist.Normal(q.loc, q.scale).to_event(q.loc.dim())
    torch.manual_seed(0)
    got = kl_divergence(guide, p)
    torch.manual_seed(0)
    torch.testing.assert_close(got, p.prior.kl(q))
    w = q.rsample()  # drawn after seed 0
    torch.manual_seed(1)
    lp = p.log_prob(w)
    torch.manual_seed(1)
    torch.testing.assert_close(lp, prior.vaes["dec"].elbo(w.reshape(-1, 3, 3, 3)).sum())
    with pytest.raises(dwp.PriorMismatchError, match=r"'head'.*\['enc', 'dec'\]"):
        prior_distribution(prior, torch.randn(3, 8), "head.weight")  # in no group
    with pytest.raises(dwp.PriorMismatchError, match=r"'dec9\.weight'.*\(3, 3, 3\).*\(3, 8\)"):
        prior_distribution(prior, torch.randn(3, 8), "dec9.weight")


@pytest.mark.parametrize(("m_factor", "scale_factor", "gap"), [(1.0, 1.0, False), (0.8, 1.5, True)])
def test_pyro_log_prob_is_a_lower_bound_on_log_p(m_factor, scale_factor, gap):
    prior = DeepWeightPrior({"g": LinearGaussianVAE(m_factor, scale_factor)})
    torch.manual_seed(0)
    w = _posterior().rsample()
    p = prior_distribution(prior, w, "conv.weight", kernel_dims=2)
    log_p = _marginal().log_prob(w.reshape(-1, K)).sum().item()  # exact, 32 slices
    mean, se, _ = _mc(lambda: p.log_prob(w), 1000)
    # the ELBO: E = log p - E KL(r || p(z | w)); equal for the exact encoder (measured -1.1
    # SE), 50 nats (83 SE) below for the worse one
    assert mean <= log_p + 5 * se
    if gap:
        assert mean < log_p - 5 * se
    else:
        assert mean > log_p - 5 * se


def _pyro_net(layer_groups, share_forward_sample=True):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 1, 3, padding=1))
    vaes = {"a": _vae((3, 3), seed=0, hidden=8), "b": _vae((3, 3), seed=1, hidden=8)}
    prior = DeepWeightPrior(vaes, layer_groups, share_forward_sample=share_forward_sample)
    return dwp.bayesianize(plain, prior, init_log_sigma=-2.0)


def _losses(net, x, y, n_data, noise=0.5):
    bnn = PyroBNN(net, lambda out: dist.Normal(out, noise), n_data=n_data)

    def pyro_loss():
        return torch.tensor(TraceMeanField_ELBO().loss(bnn.model, bnn.guide, x, y))

    def dwp_loss():
        net.train()
        nll = gaussian_nll(net(x), y, noise)
        return dwp.elbo(nll, net, n_data=n_data, batch_size=len(x)).loss.detach()

    return pyro_loss, dwp_loss


def test_pyro_trace_mean_field_elbo_equals_dwp_elbo(monkeypatch):
    # Same parameters, same draws in the same order (the weights, then each layer's bound):
    # the two losses must be equal, and only if Pyro used the registered KL (the bound).
    # Draw for draw needs three things the next test covers in expectation instead:
    # * one layer per VAE group: dwp.kl evaluates a group's layers in one batched pass of
    #   the VAE, Pyro site by site;
    # * no subsampling: Pyro's plate draws a random permutation of n_data;
    # * Pyro scores every model site (Trace.compute_log_prob) before it takes the registered
    #   KLs, and the deep weight prior's log_prob (the VAE's ELBO) draws from the global RNG;
    #   that throwaway score is kept off the random stream here;
    # * independent draws for the bound: Pyro's registered KL sees distributions, not the
    #   guide's sample, so it cannot share the forward pass's weights as dwp.kl does.
    scored = PriorDistribution.log_prob

    def score_off_stream(self, value):
        with torch.random.fork_rng(devices=[]):
            return scored(self, value)

    monkeypatch.setattr(PriorDistribution, "log_prob", score_off_stream)
    net = _pyro_net({"0": "a", "2": "b"}, share_forward_sample=False)
    x, y = torch.randn(3, 1, 5, 5), torch.randn(3, 1, 5, 5)
    pyro_loss, dwp_loss = _losses(net, x, y, n_data=len(x))
    pyro.clear_param_store()
    try:
        torch.manual_seed(1)
        expected = pyro_loss()
        torch.manual_seed(1)
        assert dwp_loss().item() == pytest.approx(expected.item(), rel=1e-5)
        # another seed, other draws of the bound: the equality is not a coincidence
        torch.manual_seed(2)
        assert pyro_loss().item() != pytest.approx(expected.item(), rel=1e-5)
    finally:
        pyro.clear_param_store()


def test_pyro_and_dwp_losses_agree_in_expectation():
    # both layers in one group (dwp.kl batches them) and minibatch scaling (N / B = 4)
    net = _pyro_net({"*": "a"})
    x, y = torch.randn(3, 1, 5, 5), torch.randn(3, 1, 5, 5)
    pyro_loss, dwp_loss = _losses(net, x, y, n_data=12)
    pyro.clear_param_store()
    try:
        p_mean, p_se, _ = _mc(pyro_loss, 300, seed=0)
        d_mean, d_se, _ = _mc(dwp_loss, 300, seed=1)
    finally:
        pyro.clear_param_store()
    # a KL counted twice, or a data term scaled by B / N, would be off by hundreds of SE
    assert abs(p_mean - d_mean) < 5 * math.hypot(p_se, d_se)


def test_bayesianize_copies_the_prior_so_models_do_not_share_trained_state():
    # The encoder trains with the model: two models made from one prior object must not
    # share it, and the object itself must stay as fitted (results must not depend on the
    # order in which models are trained).
    torch.manual_seed(0)
    prior = dwp.DeepWeightPrior({"all": dwp.KernelVAE((3, 3))})
    before = copy.deepcopy(prior.state_dict())
    nets = [
        dwp.bayesianize(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)), prior)
        for _ in range(2)
    ]
    encoder = [net[0].weight_prior.vae.encoder for net in nets]
    assert encoder[0] is not encoder[1]
    assert nets[0][0].weight_prior.vae is nets[0][1].weight_prior.vae  # one VAE per model
    optimiser = torch.optim.SGD(nets[0].parameters(), lr=0.1)
    dwp.kl(nets[0]).backward()
    optimiser.step()
    for key, value in prior.state_dict().items():
        assert torch.equal(value, before[key]) if torch.is_tensor(value) else value == before[key]
    assert not torch.equal(
        encoder[0].net[0].weight, encoder[1].net[0].weight
    )  # only the trained model's encoder moved


def test_kernel_fraction_is_unbiased_and_cheaper():
    # A random fraction of the kernels, scaled by M / m, estimates the same bound: means over
    # many evaluations agree within 5 standard errors of their difference.
    torch.manual_seed(0)
    vae = KernelVAE((3, 3), hidden=8)
    posterior = MeanFieldNormal(
        0.3 * torch.randn(6, 5, 3, 3), torch.full((6, 5, 3, 3), -2.0), "conv.weight", 2
    )
    full = DeepWeightPrior({"g": vae}).for_site("conv.weight", posterior.loc, 2)
    half = DeepWeightPrior({"g": vae}, kernel_fraction=0.5).for_site(
        "conv.weight", posterior.loc, 2
    )
    assert full.batch_key() != half.batch_key()
    with torch.no_grad():
        a = torch.stack([full.kl(posterior) for _ in range(400)])
        b = torch.stack([half.kl(posterior) for _ in range(400)])
    se = (a.var() / len(a) + b.var() / len(b)).sqrt()
    assert (a.mean() - b.mean()).abs() < 5 * se
    assert b.var() > a.var()  # the price: more variance
    with pytest.raises(ValueError, match="kernel_fraction"):
        DeepWeightPrior({"g": vae}, kernel_fraction=0.0)


# -- sharing the forward pass's weight sample ------------------------------------------------
def test_reparam_sample_has_the_reparameterisation_gradients():
    loc = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    log_scale = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def draw(loc, log_scale):
        torch.manual_seed(0)  # the same eps at every evaluation gradcheck makes
        return reparam_sample(loc, log_scale)

    assert torch.autograd.gradcheck(draw, (loc, log_scale))
    torch.manual_seed(0)
    eps = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(draw(loc, log_scale), loc + log_scale.exp() * eps)


def test_reparam_sample_can_be_backpropagated_twice():
    # a data loss and a KL that shares the sample may call backward() separately
    loc = torch.randn(5, dtype=torch.float64, requires_grad=True)
    log_scale = torch.randn(5, dtype=torch.float64, requires_grad=True)
    w = reparam_sample(loc, log_scale)
    w.sum().backward()
    w.square().sum().backward()
    noise = (w - loc).detach()  # sigma * eps
    torch.testing.assert_close(loc.grad, 1 + 2 * w.detach())
    torch.testing.assert_close(log_scale.grad, (1 + 2 * w.detach()) * noise)


def _forward(net, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    return net(x)


def test_forward_sample_keeps_the_bound_exact_in_expectation():
    # forward then KL, as in a training step: the bound's first weight sample is the
    # forward's, and with the exact encoder its mean is still the closed-form KL
    net, kl = _linear_net()
    values = []
    torch.manual_seed(0)
    for _ in range(400):
        net(torch.randn(2, 4, 6, 6, dtype=torch.float64))
        assert all(layer.weight_posterior.sample is not None for layer in (net.c1, net.c2))
        values.append(dwp.kl(net).item())
    values = torch.tensor(values, dtype=torch.float64)
    assert abs(values.mean().item() - kl) < 5 * values.std().item() / 400**0.5


def test_the_bound_evaluates_the_vae_at_the_forward_sample():
    net, _ = _linear_net()
    used = {}
    op = net.c1._op

    def recording_op(input, weight, bias, *args, **kwargs):
        used["weight"] = weight
        return op(input, weight, bias, *args, **kwargs)

    net.c1._op = recording_op
    _forward(net)
    posterior = net.c1.weight_posterior
    assert posterior.sample is used["weight"]
    # the bound at that sample, written out: only z is drawn inside kl()
    vae = net.c1.weight_prior.vae
    w = used["weight"].reshape(-1, *KS)
    torch.manual_seed(3)
    z_loc, z_scale = vae.encode(w)
    z = z_loc + z_scale * torch.randn_like(z_loc)
    w_loc, w_scale = vae.decode(z)
    expected = (
        -posterior.entropy()
        + (0.5 * (z_loc**2 + z_scale**2) - z_scale.log() - 0.5).sum()
        - torch.distributions.Normal(w_loc, w_scale).log_prob(w).sum()
    )
    torch.manual_seed(3)
    torch.testing.assert_close(net.c1.weight_prior.kl(posterior), expected)


def test_separate_backward_passes_equal_one_joint_pass():
    grads = []
    for joint in (True, False):
        net, _ = _linear_net()
        out = _forward(net, seed=1).square().sum()
        torch.manual_seed(2)
        kl = dwp.kl(net)
        if joint:
            (out + kl).backward()
        else:
            out.backward()
            kl.backward()  # through the forward's sample a second time
        grads.append([p.grad.clone() for p in (net.c1.weight, net.c1.weight_log_sigma)])
    for joint, separate in zip(*grads, strict=True):
        torch.testing.assert_close(separate, joint)


def test_a_stale_or_missing_sample_is_not_shared():
    net, _ = _linear_net()
    layer = net.c1
    _forward(net)
    assert layer.weight_posterior.sample is not None
    torch.optim.SGD(net.parameters(), lr=0.1).step()  # no gradients: a no-op update...
    assert layer.weight_posterior.sample is not None
    dwp.kl(net).backward()
    torch.optim.SGD(net.parameters(), lr=0.1).step()  # ...a real one changes the weights
    assert layer.weight_posterior.sample is None
    _forward(net)
    net.load_state_dict(net.state_dict())  # copies in place: the versions move on
    assert layer.weight_posterior.sample is None
    with torch.no_grad():
        _forward(net)  # no graph to share
    assert layer.weight_posterior.sample is None
    with dwp.estimator("local_reparam", net):
        _forward(net)  # draws no weights
    assert layer.weight_posterior.sample is None


def test_only_priors_that_use_samples_get_them():
    normal = dwp.bayesianize(nn.Conv2d(4, 2, 3))  # N(0, 1): closed form
    normal(torch.randn(1, 4, 5, 5))
    assert normal.weight_posterior.sample is None
    net, _ = _linear_net(share_forward_sample=False)
    _forward(net)
    assert net.c1.weight_posterior.sample is None
    assert "share_forward_sample=False" in repr(net.c1.weight_prior)


def test_a_model_with_a_shared_sample_deep_copies_without_it():
    net, _ = _linear_net()
    _forward(net)
    clone = copy.deepcopy(net)  # a graph tensor in the module would make this raise
    assert clone.c1.weight_posterior.sample is None
    assert net.c1.weight_posterior.sample is not None


@pytest.mark.parametrize("options", [{"chunk_size": 7}, {"kernel_fraction": 0.5}])
def test_chunks_and_subsets_use_the_forward_sample(options):
    net, kl = _linear_net(**options)
    values = []
    torch.manual_seed(0)
    for _ in range(400):
        net(torch.randn(2, 4, 6, 6, dtype=torch.float64))
        values.append(dwp.kl(net).item())
    values = torch.tensor(values, dtype=torch.float64)
    assert abs(values.mean().item() - kl) < 5 * values.std().item() / 400**0.5
    net.zero_grad()
    _forward(net)
    dwp.kl(net).backward()
    assert all(layer.weight_log_sigma.grad.abs().sum() > 0 for layer in (net.c1, net.c2))


def test_share_forward_sample_survives_save_and_load(tmp_path):
    prior = DeepWeightPrior({"g": _vae((3, 3), hidden=4)}, share_forward_sample=False)
    prior.save(tmp_path / "p.pt")
    assert DeepWeightPrior.load(tmp_path / "p.pt").share_forward_sample is False
    assert DeepWeightPrior.load(tmp_path / "p.pt", share_forward_sample=True).share_forward_sample


@pytest.mark.parametrize("shared", [False, True])
def test_bound_gradients_are_unbiased_with_or_without_the_forward_sample(shared):
    # with the exact encoder E[grad bound] = grad KL(q || p) in closed form; each of the
    # 864 gradient entries' MC mean must lie within 5 standard errors of it (for 864
    # standard normals that fails with probability ~5e-4)
    net, _ = _linear_net()
    layers = (net.c1, net.c2)

    def params():
        return [p for layer in layers for p in (layer.weight, layer.weight_log_sigma)]

    def closed_form(layer):
        q = layer.weight_posterior
        loc, var = q.loc.reshape(-1, K), q.scale.reshape(-1, K) ** 2
        return kl_divergence(MultivariateNormal(loc, torch.diag_embed(var)), _marginal()).sum()

    exact = torch.autograd.grad(sum(closed_form(layer) for layer in layers), params())
    torch.manual_seed(0)
    n = 600
    grads = []
    for _ in range(n):
        if shared:
            net(torch.randn(2, 4, 6, 6, dtype=torch.float64))
        grads.append(torch.autograd.grad(dwp.kl(net), params()))
    for i, target in enumerate(exact):
        draws = torch.stack([g[i] for g in grads])
        se = draws.std(0) / n**0.5
        assert ((draws.mean(0) - target).abs() <= 5 * se).all()


# -- 8. the importance-weighted bound and the fit report's three-way split ------------------
def test_iwae_is_exact_with_the_exact_encoder_and_tighter_than_the_elbo():
    w = _posterior(shape=(16, 1, 3, 3)).loc.reshape(-1, *KS)
    log_p = _marginal().log_prob(w.reshape(-1, K))
    exact = LinearGaussianVAE()
    torch.manual_seed(0)
    with torch.no_grad():
        # r = p(z | w): every importance weight is p(w), whatever K and the draws
        for k in (1, 8):
            torch.testing.assert_close(exact.iwae(w, k), log_p, rtol=1e-9, atol=1e-9)
        worse = LinearGaussianVAE(0.8, 1.5)
        elbo = torch.stack([worse.elbo(w).mean() for _ in range(200)])
        iwae = torch.stack([worse.iwae(w, 64).mean() for _ in range(200)])
    se = math.hypot(elbo.std().item(), iwae.std().item()) / math.sqrt(200)
    # measured: ELBO 1.59 nats per kernel below log p, the 64-sample bound 0.02 below it
    assert elbo.mean() < iwae.mean() - 5 * se
    assert iwae.mean() <= log_p.mean() + 5 * iwae.std() / math.sqrt(200)
    site = DeepWeightPrior({"g": worse}).for_group("g")
    torch.manual_seed(1)
    scores = site.kernel_log_prob(w)
    torch.manual_seed(1)
    torch.testing.assert_close(scores, site.vae.iwae(w, dwp.priors.report.IWAE_SAMPLES))


def _linear_bank(n_per_group=(400, 300)):
    g = torch.Generator().manual_seed(3)
    parts = []
    for n in n_per_group:
        z = torch.randn(n, D, generator=g, dtype=torch.float64)
        noise = S * torch.randn(n, K, generator=g, dtype=torch.float64)
        parts.append((z @ A.T + B + noise).float().reshape(n, *KS))
    groups = torch.cat([torch.full((n,), i) for i, n in enumerate(n_per_group)])
    return dwp.KernelBank(
        kernels=torch.cat(parts), group=groups, source=torch.zeros(len(groups), dtype=torch.int64),
        layer=groups.clone(), group_names=["enc", "dec"], source_names=["net.pt"],
        layer_names=["enc1", "dec1"], layer_groups={"enc1": "enc", "dec1": "dec"},
        metadata={"group_by": "test"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def split_fit():
    bank = _linear_bank()
    options = dict(latent_dim=D, hidden=8, epochs=4, batch_size=64, progress=False, seed=2)
    return bank, DeepWeightPrior.fit(bank, **options)


def test_fit_keeps_test_kernels_out_of_every_choice(split_fit):
    bank, prior = split_fit
    splits = dwp.priors.split_bank(bank, seed=2)  # the fit's split, rebuilt from the bank
    assert prior.metadata["split"] == {"val_fraction": 0.1, "test_fraction": 0.1, "seed": 2}
    for group, kernels in bank.groups().items():
        fit, parts = prior.metadata["fits"][group], splits[group]
        assert fit["n_test"] == len(parts["test"]) == round(0.1 * len(kernels))
        assert (fit["n_train"], fit["n_val"]) == (len(parts["train"]), len(parts["val"]))
        assert fit["n_train"] + fit["n_val"] + fit["n_test"] == len(kernels)
        # disjoint parts of the group's kernels (linear-Gaussian kernels never repeat)
        rows = torch.cat([parts["train"], parts["val"], parts["test"]]).flatten(1)
        assert len(torch.unique(rows, dim=0)) == len(kernels)
        # the old keys keep their meaning: the validation scores of the fit
        assert fit["best_val_elbo"] == max(h["val_elbo"] for h in fit["history"])
        assert fit["baselines"] == dwp.vae.gaussian_baselines(parts["train"], parts["val"])


def test_fit_report_scores_every_prior_on_the_test_kernels(split_fit, tmp_path):
    bank, prior = split_fit
    splits = dwp.priors.split_bank(bank, seed=2)
    held_out = prior.metadata["held_out"]
    assert held_out["reference"] == "kernel Gaussian"
    assert held_out["how"] == {
        "VAE": "IWAE bound, K=64", "kernel Gaussian": "exact", "diagonal Gaussian": "exact"
    }  # fmt: skip
    train = {g: parts["train"] for g, parts in splits.items()}
    test = {g: parts["test"] for g, parts in splits.items()}
    for group in bank.group_names:
        entry = held_out["groups"][group]
        assert entry["kernels"] == len(test[group])
        # the Gaussians by hand: fitted on the VAE's training kernels, scored on the test ones
        mean, cov, _ = dwp.priors.fit_kernel_gaussian(train[group])
        full = MultivariateNormal(mean, cov).log_prob(test[group].flatten(1).double())
        assert entry["scores"]["kernel Gaussian"]["mean"] == pytest.approx(full.mean().item())
        # the VAE: its test score is not the validation score that chose the epoch
        assert entry["scores"]["VAE"]["mean"] != prior.metadata["fits"][group]["best_val_elbo"]
    compared = {
        "VAE": prior,
        "kernel Gaussian": dwp.KernelGaussianPrior.fit(train),
        "diagonal Gaussian": dwp.KernelGaussianPrior.fit(train, diagonal=True),
    }
    again = dwp.priors.held_out_scores(compared, test, reference="kernel Gaussian", seed=2)
    assert again == held_out  # the same draws: the report is reproducible
    report = prior.fit_report()
    assert report == dwp.priors.fit_report(compared, test, reference="kernel Gaussian", seed=2)
    lines = report.splitlines()
    assert "VAE, IWAE bound, K=64 (nats/kernel)" in lines[0]
    assert "VAE − kernel Gaussian (nats/kernel, paired)" in lines[0]
    assert len(lines) == 2 + len(bank.group_names) + 1  # the groups and all groups
    prior.save(tmp_path / "prior.pt")
    assert DeepWeightPrior.load(tmp_path / "prior.pt").fit_report() == report


def test_fit_without_a_test_split_reports_its_validation_scores():
    bank = _linear_bank((60, 50))
    prior = DeepWeightPrior.fit(
        bank, latent_dim=D, hidden=4, epochs=1, progress=False, test_fraction=0.0
    )
    assert "held_out" not in prior.metadata
    assert all(fit["n_test"] == 0 for fit in prior.metadata["fits"].values())
    lines = prior.fit_report().splitlines()
    assert "validation" in lines[0] and "optimistic" in lines[0]
    assert len(lines) == 2 + len(bank.group_names) + 1
    with pytest.raises(ValueError, match=r"group 'dec'.*2 kernel\(s\).*none left to train on"):
        DeepWeightPrior.fit(_linear_bank((60, 2)), hidden=4, epochs=1, progress=False)


# -- empirical Bayes: a learned scale per group --------------------------------------------------
def test_a_learned_scale_is_the_change_of_variables_of_the_kernels(tmp_path):
    """With ``learn_scale=True`` a group's prior is p_VAE(w / c) / c^k.  A KL is invariant
    under an invertible map of the variable, so the bound of q(w) under the scaled prior
    must equal the bound of q(w / c) (means / c, log-scales - log c) under the VAE itself,
    draw for draw; the gradient reaches the factor, which the group's layers share and the
    prior file keeps."""
    torch.manual_seed(0)
    vae = dwp.KernelVAE((3, 3))
    prior = DeepWeightPrior({"all": vae}, learn_scale=True, share_forward_sample=False)
    net = dwp.bayesianize(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3)), prior,
                          init_log_sigma=-2.0)  # fmt: skip
    factor = net[0].weight_prior.log_scale_factor
    assert factor is net[1].weight_prior.log_scale_factor  # one per group
    with torch.no_grad():
        factor.fill_(0.4)
    torch.manual_seed(1)
    scaled = dwp.kl(net)
    reference = dwp.bayesianize(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3)),
                                DeepWeightPrior({"all": vae}, share_forward_sample=False),
                                init_log_sigma=-2.0)  # fmt: skip
    with torch.no_grad():
        for ours, theirs in zip(net, reference, strict=True):
            theirs.weight.copy_(ours.weight * math.exp(-0.4))
            theirs.weight_log_sigma.copy_(ours.weight_log_sigma - 0.4)
    torch.manual_seed(1)
    torch.testing.assert_close(scaled, dwp.kl(reference), rtol=1e-5, atol=1e-4)
    scaled.backward()
    assert factor.grad is not None and torch.isfinite(factor.grad)
    prior.save(tmp_path / "scaled.pt")
    with torch.no_grad():
        prior.log_scale_factors["all"].fill_(0.25)
    prior.save(tmp_path / "scaled.pt")
    loaded = DeepWeightPrior.load(tmp_path / "scaled.pt")
    assert loaded.learn_scale and float(loaded.log_scale_factors["all"].detach()) == 0.25


# -- the device option of the fit -----------------------------------------------------------
def _small_prior_fit(**options):
    bank = _linear_bank((60, 50))
    return DeepWeightPrior.fit(
        bank, latent_dim=D, hidden=4, epochs=1, batch_size=32, iwae_samples=4, progress=False,
        **options,
    )  # fmt: skip


def test_default_and_explicit_cpu_device_fit_the_same_prior_and_file(tmp_path):
    priors = [_small_prior_fit(), _small_prior_fit(device="cpu")]
    priors.append(_small_prior_fit(device=torch.device("cpu")))
    reference = priors[0].state_dict()
    for i, prior in enumerate(priors):
        state = prior.state_dict()
        assert all(torch.equal(state[k], v) for k, v in reference.items() if torch.is_tensor(v))
        assert prior.metadata == priors[0].metadata  # the fits' histories and held-out scores
        prior.save(tmp_path / f"{i}.pt")
    files = {(tmp_path / f"{i}.pt").read_bytes() for i in range(len(priors))}
    assert len(files) == 1  # byte for byte the same file


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", r"^device 'gpu' is not a torch device"),
        (f"cuda:{torch.cuda.device_count()}", r"is not available on this machine \(available: cpu"),
    ],
)  # fmt: skip
def test_a_bad_device_is_rejected_before_any_vae_is_fitted(monkeypatch, device, message):
    def no_fit(*args, **kwargs):
        raise AssertionError("a VAE fit started")

    monkeypatch.setattr(dwp.priors.deep, "fit_kernel_vae", no_fit)
    with pytest.raises(ValueError, match=message):
        _small_prior_fit(device=device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_prior_fitted_on_cuda_stays_there_and_its_file_loads_on_the_cpu(tmp_path):
    prior = _small_prior_fit(device="cuda")
    assert all(t.device.type == "cuda" for t in (*prior.parameters(), *prior.buffers()))
    assert math.isfinite(prior.held_out()["vae"])
    site = prior.for_group("enc")
    assert site.sample((4, 2, *KS)).device.type == "cuda"
    prior.save(tmp_path / "prior.pt")
    loaded = DeepWeightPrior.load(tmp_path / "prior.pt")
    for key, value in prior.state_dict().items():
        if torch.is_tensor(value):
            assert loaded.state_dict()[key].device.type == "cpu"
            assert torch.equal(loaded.state_dict()[key], value.cpu()), key
    assert loaded.metadata == prior.metadata
