"""The kernel VAE (:class:`dwp.KernelVAE`) and its fitting (:func:`dwp.fit_kernel_vae`).

Shapes and argument checks for both architectures; then a fit on a linear-Gaussian kernel
bank, whose exact log-likelihood is known in closed form: w = A z + b + s * eps with
z ~ N(0, I_d) and A with orthogonal columns, so p(w) = N(b, A A^T + s^2 I) and the exact
posterior p(z | w) is a diagonal Gaussian that a mean-field encoder can represent.  The
fitted VAE's held-out ELBO must lie below the true log-likelihood (it is a bound) and close
to it, well above a diagonal Gaussian; the fit is reproducible, leaves Pyro's parameter
store and the global RNG alone, and stops early when told to.
"""

from __future__ import annotations

import itertools
import math
import re

import pyro
import pytest
import torch

import dwp
from dwp.vae import KernelVAE, default_latent_dim, fit_kernel_vae

KERNEL_SHAPES = [(3,), (3, 3), (5, 5), (3, 3, 3), (3, 1, 2)]


def linear_gaussian_bank(n, kernel_shape=(3, 3), d=2, s=0.05, seed=0):
    """``n`` kernels w = A z + b + s * eps (float32) and the exact p(w) (float64).

    A has orthogonal columns of norms 0.3 and 0.15 (kernel-like magnitudes), so the exact
    posterior p(z | w) = N(S A^T (w - b) / s^2, S) with S = (I + A^T A / s^2)^-1 diagonal.
    """
    g = torch.Generator().manual_seed(seed)
    k = math.prod(kernel_shape)
    q, _ = torch.linalg.qr(torch.randn(k, d, generator=g, dtype=torch.float64))
    a = q * torch.linspace(0.3, 0.15, d, dtype=torch.float64)
    b = 0.1 * torch.randn(k, generator=g, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = z @ a.T + b + s * torch.randn(n, k, generator=g, dtype=torch.float64)
    marginal = torch.distributions.MultivariateNormal(
        b, a @ a.T + s**2 * torch.eye(k, dtype=torch.float64)
    )
    return w.reshape(n, *kernel_shape).float(), marginal


def val_split(kernels, fit, seed=0):
    """The held-out kernels of a fit (the same permutation as ``fit_kernel_vae``)."""
    perm = torch.randperm(len(kernels), generator=torch.Generator().manual_seed(seed))
    return kernels[perm[: fit.n_val]]


# -- shapes and arguments ----------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["mlp", "conv"])
@pytest.mark.parametrize("kernel_shape", KERNEL_SHAPES)
def test_shapes(architecture, kernel_shape):
    torch.manual_seed(0)
    vae = KernelVAE(kernel_shape, architecture=architecture, hidden=16)
    n, latent = 5, vae.latent_dim
    w = 0.1 * torch.randn(n, *kernel_shape)
    z_loc, z_scale = vae.encode(w)
    assert z_loc.shape == z_scale.shape == (n, latent)
    assert (z_scale > 0).all()
    w_loc, w_scale = vae.decode(torch.randn(n, latent))
    assert w_loc.shape == w_scale.shape == (n, *kernel_shape)
    assert (w_scale > 0).all()
    elbo = vae.elbo(w)
    assert elbo.shape == (n,) and torch.isfinite(elbo).all()
    assert vae.elbo(w, n_samples=3).shape == (n,)
    assert vae.sample(7).shape == vae.sample(7, use_mean=True).shape == (7, *kernel_shape)
    assert KernelVAE(**vae.config()).config() == vae.config()  # config rebuilds the VAE


@pytest.mark.parametrize(
    ("kernel_shape", "latent"),
    [((3,), 2), ((3, 3), 2), ((5, 5), 4), ((7, 7), 4), ((3, 3, 3), 6), ((3, 1, 2), 6)],
)
def test_default_latent_sizes(kernel_shape, latent):
    # the papers: 6 for 3D kernels, 4 for 5x5 and larger 2D kernels, 2 for 3x3 and smaller
    assert default_latent_dim(kernel_shape) == latent
    assert KernelVAE(kernel_shape, hidden=4).latent_dim == latent
    assert KernelVAE(kernel_shape, latent_dim=3, hidden=4).latent_dim == 3


@pytest.mark.parametrize("kernel_shape", [(3, 3), (3, 3, 3)])
def test_conv_decoder_is_tanh_bounded(kernel_shape):
    # Kuzina et al.'s heads: means in [-1, 1], log-scales in [-1, 1] -> scales in [e^-1, e],
    # even for latents far outside N(0, I)
    torch.manual_seed(0)
    vae = KernelVAE(kernel_shape, architecture="conv")
    loc, scale = vae.decode(20.0 * torch.randn(64, vae.latent_dim))
    assert loc.abs().max() <= 1.0
    assert scale.min() >= math.exp(-1.0) * (1 - 1e-6)
    assert scale.max() <= math.exp(1.0) * (1 + 1e-6)


@pytest.mark.parametrize("kernel_shape", [(), (3, 3, 3, 3), (0, 3), (3, -1)])
def test_bad_kernel_shape(kernel_shape):
    with pytest.raises(ValueError, match=re.escape(str(tuple(kernel_shape)))):
        KernelVAE(kernel_shape)


def test_bad_architecture():
    with pytest.raises(ValueError, match="'rnn'"):
        KernelVAE((3, 3), architecture="rnn")


@pytest.mark.parametrize("architecture", ["mlp", "conv"])
@pytest.mark.parametrize("batch_shape", [(4, 3, 3), (4, 27), (3, 3, 3), (4, 3, 3, 3, 1)])
def test_wrong_batch_shape_names_it(architecture, batch_shape):
    vae = KernelVAE((3, 3, 3), architecture=architecture, hidden=4)
    message = re.escape(str(batch_shape))
    with pytest.raises(ValueError, match=rf"\(3, 3, 3\).*{message}"):
        vae.encode(torch.zeros(batch_shape))
    with pytest.raises(ValueError, match=message):
        vae.elbo(torch.zeros(batch_shape))


# -- fitting on a bank with a known likelihood -------------------------------------------
N_KERNELS = 5000


@pytest.fixture(scope="module")
def linear_fit():
    kernels, marginal = linear_gaussian_bank(N_KERNELS)
    fit = fit_kernel_vae(
        kernels, latent_dim=2, hidden=32, epochs=30, batch_size=256, lr=3e-3,
        progress=False, seed=0,
    )  # fmt: skip
    return kernels, marginal, fit


def test_fit_elbo_is_a_tight_bound_on_the_true_likelihood(linear_fit):
    kernels, marginal, fit = linear_fit
    val = val_split(kernels, fit)
    assert fit.n_val == round(0.1 * N_KERNELS) and fit.n_train + fit.n_val == N_KERNELS
    true_ll = marginal.log_prob(val.flatten(1).double()).float()
    true_mean = true_ll.mean().item()  # measured 11.146 nats per kernel

    # Paired MC error of a one-sample held-out ELBO (the ELBO minus the true log-likelihood of
    # the same kernels, so the spread of log p(w) across kernels cancels): measured 0.041
    # nats over the 500 held-out kernels.
    torch.manual_seed(1)
    with torch.no_grad():
        gaps = torch.stack([fit.vae.elbo(val) - true_ll for _ in range(32)])
    se = gaps.mean(1).std().item()
    mean_elbo = true_mean + gaps.mean().item()  # 32-pass ELBO of the returned VAE

    # 1. A bound: E[ELBO] <= log p(w).  The best epoch's one-pass estimate is the maximum of
    #    30 noisy ones (selection bias up to ~2.6 SE), hence 5 SE of slack for it; the
    #    32-pass mean has no selection bias.  Measured: best 10.990, 32-pass 10.960, truth
    #    11.146.  A missing KL(r || p(z)) term would overshoot by ~3 nats, far beyond 5 SE.
    assert fit.best_val_elbo <= true_mean + 5 * se
    assert mean_elbo <= true_mean + 5 * se / math.sqrt(32) + 1e-3
    # 2. Tight: measured gaps 0.156 (best) and 0.185 (32-pass); a diagonal Gaussian is 3.1
    #    nats below the truth, so a margin of 0.5 separates a VAE that found the latent
    #    structure from one that did not.
    assert fit.best_val_elbo >= true_mean - 0.5
    assert mean_elbo >= true_mean - 0.5
    # 3. The baselines: the truth is a full-covariance Gaussian, so that baseline matches it
    #    (measured 0.012 below: 54 parameters fitted on 4500 kernels); the diagonal one
    #    misses the correlations and is clearly below the VAE (measured 2.97 nats).
    assert set(fit.baselines) == {"diagonal", "full"}
    assert abs(fit.baselines["full"] - true_mean) < 0.1
    assert fit.baselines["diagonal"] < true_mean - 2.0
    assert fit.best_val_elbo > fit.baselines["diagonal"] + 2.0


def test_fit_history(linear_fit):
    kernels, marginal, fit = linear_fit
    history = fit.history
    assert [h["epoch"] for h in history] == list(range(30))
    assert all(set(h) == {"epoch", "train_elbo", "val_elbo", "lr"} for h in history)
    assert all(math.isfinite(h["train_elbo"]) and math.isfinite(h["val_elbo"]) for h in history)
    assert all(h["lr"] == pytest.approx(3e-3) for h in history)  # no plateau within 30 epochs
    assert fit.best_val_elbo == max(h["val_elbo"] for h in history)
    assert fit.stopped == "epoch budget (30) spent"
    # Nats per kernel, not per batch or per bank: the last epochs' training ELBO is near the
    # true mean log-likelihood of the bank (measured within 0.5 nats; a wrong scaling by the
    # batch or bank size would be off by a factor of hundreds).
    true_mean = marginal.log_prob(kernels.flatten(1).double()).mean().item()
    assert abs(history[-1]["train_elbo"] - true_mean) < 1.0
    assert history[0]["val_elbo"] < history[-1]["val_elbo"] - 2.0  # it learned
    summary = fit.summary()
    assert summary["epochs"] == 30 and summary["history"] == history
    assert summary["n_train"] == fit.n_train and summary["best_val_elbo"] == fit.best_val_elbo


def test_fitted_vae_samples_look_like_the_bank(linear_fit):
    kernels, marginal, fit = linear_fit
    torch.manual_seed(0)
    with torch.no_grad():
        samples = fit.vae.sample(4000).flatten(1).double()
    # the true log-likelihood of the VAE's samples is close to that of real kernels (its
    # spread across kernels is ~2.1 nats, so a 4000-mean has SE 0.035): measured 10.75 vs
    # 11.22.  Samples of a diagonal Gaussian fitted to the bank score -0.55, 11.8 nats
    # lower: a sampler that ignored the latent structure fails by far.
    real = marginal.log_prob(kernels.flatten(1).double()).mean().item()
    assert marginal.log_prob(samples).mean().item() == pytest.approx(real, abs=1.5)


# -- reproducibility and side effects ----------------------------------------------------
def _small_fit(seed, **options):
    kernels, _ = linear_gaussian_bank(300)
    defaults = dict(hidden=16, epochs=3, batch_size=64, progress=False)
    return fit_kernel_vae(kernels, seed=seed, **{**defaults, **options})


def test_same_seed_same_vae_bitwise():
    a, b, c = _small_fit(0), _small_fit(0), _small_fit(1)
    state_a, state_b, state_c = a.vae.state_dict(), b.vae.state_dict(), c.vae.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert a.history == b.history and a.baselines == b.baselines
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    assert a.history != c.history


def test_fit_leaves_pyro_param_store_and_global_rng_alone():
    store = pyro.get_param_store()
    sentinel = pyro.param("test_vae_sentinel", torch.arange(3.0))
    names = set(store.keys())
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    _small_fit(0, epochs=1)
    assert torch.equal(torch.rand(5), expected)  # global RNG: as if the fit never ran
    try:
        assert set(store.keys()) == names  # no "encoder$$$..." / "decoder$$$..." left over
        assert pyro.param("test_vae_sentinel") is sentinel
        assert torch.equal(sentinel, torch.arange(3.0))
    finally:
        del store["test_vae_sentinel"]


def test_early_stopping_returns_the_best_epoch():
    # patience 2: the fit ends 2 epochs after its best one, and returns the best epoch's
    # weights, which a fit stopped by its budget right at that epoch reproduces bitwise
    # (the trajectory is deterministic given the seed).
    options = dict(epochs=200, lr=3e-2, early_stopping=2, lr_patience=100)
    fit = _small_fit(0, **options)
    vals = [h["val_elbo"] for h in fit.history]
    best = vals.index(max(vals))
    assert fit.stopped == "no held-out improvement for 2 epochs"
    assert len(fit.history) == best + 3 < 200
    assert fit.best_val_elbo == vals[best]
    short = _small_fit(0, **{**options, "epochs": best + 1})
    assert short.stopped == f"epoch budget ({best + 1}) spent"
    assert short.history == fit.history[: best + 1]
    state, short_state = fit.vae.state_dict(), short.vae.state_dict()
    assert all(torch.equal(state[k], short_state[k]) for k in state)


def test_lr_floor_stops_the_fit():
    # patience 0, factor 0.5: every epoch without improvement halves the lr; the fit stops
    # when it reaches min_lr = lr / 4.
    fit = _small_fit(0, epochs=200, lr=3e-2, lr_patience=0, lr_factor=0.5, min_lr=7.5e-3)
    lrs = [h["lr"] for h in fit.history]
    assert fit.stopped == "learning rate reached its floor"
    assert len(lrs) < 200
    assert lrs[-1] == pytest.approx(7.5e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    assert all(any(lr == pytest.approx(v) for v in (3e-2, 1.5e-2, 7.5e-3)) for lr in lrs)


# -- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_kernels_are_rejected(bad):
    kernels = torch.randn(10, 3, 3)
    kernels[4, 1, 2] = bad
    with pytest.raises(ValueError, match="non-finite"):
        fit_kernel_vae(kernels, progress=False)


@pytest.mark.parametrize("shape", [(1, 3, 3), (0, 3, 3), (5,)])
def test_too_few_kernels_are_rejected(shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        fit_kernel_vae(torch.randn(shape), progress=False)


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_val_fraction_is_rejected(val_fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        fit_kernel_vae(torch.randn(10, 3, 3), val_fraction=val_fraction, progress=False)


def test_val_fraction_leaving_no_training_kernel_is_rejected():
    # 0.96 of 10 kernels rounds to 10 held out: nothing left to train on.  Should be a
    # ValueError naming val_fraction, not a ZeroDivisionError from inside Pyro's plate.
    with pytest.raises(ValueError, match="val_fraction"):
        fit_kernel_vae(torch.randn(10, 3, 3), val_fraction=0.96, epochs=1, progress=False)


def test_smallest_accepted_bank_fits():
    # "need at least 2 kernels": 2 kernels are accepted, one held out, one to train on.  The
    # Gaussian baselines of a single training kernel are degenerate, but the fit must return.
    fit = fit_kernel_vae(torch.randn(2, 3, 3), epochs=2, hidden=4, progress=False)
    assert (fit.n_train, fit.n_val) == (1, 1)
    assert len(fit.history) == 2 and math.isfinite(fit.best_val_elbo)
    assert set(fit.baselines) == {"diagonal", "full"}


def test_public_exports():
    assert dwp.KernelVAE is KernelVAE and dwp.fit_kernel_vae is fit_kernel_vae
    assert isinstance(_small_fit(0, epochs=1), dwp.VAEFit)


def test_normal_nll_sum_matches_torch_and_its_hand_written_gradients_check() -> None:
    from dwp.normal import normal_nll_sum as _normal_nll_sum

    g = torch.Generator().manual_seed(0)
    shape = (40, 3, 3, 3)
    x = torch.randn(shape, generator=g, dtype=torch.double).requires_grad_()
    loc = torch.randn(shape, generator=g, dtype=torch.double).requires_grad_()
    scale = (torch.rand(shape, generator=g, dtype=torch.double) + 0.2).requires_grad_()
    expected = -torch.distributions.Normal(loc, scale).log_prob(x).sum()
    torch.testing.assert_close(_normal_nll_sum(x, loc, scale), expected)
    assert torch.autograd.gradcheck(_normal_nll_sum, (x, loc, scale))
    # only some inputs needing gradients (x fixed, as when scoring source kernels)
    assert torch.autograd.gradcheck(lambda m, s: _normal_nll_sum(x.detach(), m, s), (loc, scale))


def test_mlp_heads_equal_the_chunked_single_matmul() -> None:
    """The decoder's head runs as two matmuls; it must equal the saved format's one Linear."""
    torch.manual_seed(0)
    vae = KernelVAE((3, 3, 3), hidden=8)
    z = torch.randn(5, vae.latent_dim)
    loc, scale = vae.decode(z)
    net = vae.decoder.net
    whole = net(z)
    ref_loc, ref_raw = whole.chunk(2, dim=-1)
    torch.testing.assert_close(loc.reshape(5, -1), ref_loc)
    torch.testing.assert_close(
        scale.reshape(5, -1), torch.nn.functional.softplus(ref_raw) + vae.min_scale
    )


# -- held-out kernels given, and the split ----------------------------------------------------
def test_split_kernels_parts_are_disjoint_sized_and_seeded():
    kernels = torch.arange(50.0).reshape(50, 1)
    parts = dwp.vae.split_kernels(
        kernels, {"test": 0.1, "val": 0.2}, torch.Generator().manual_seed(0)
    )
    assert [len(parts[p]) for p in ("test", "val", "train")] == [5, 10, 35]
    assert sorted(torch.cat(list(parts.values())).flatten().tolist()) == list(range(50))
    again = dwp.vae.split_kernels(
        kernels, {"test": 0.1, "val": 0.2}, torch.Generator().manual_seed(0)
    )
    assert all(torch.equal(parts[p], again[p]) for p in parts)
    tiny = dwp.vae.split_kernels(kernels[:3], {"test": 0.01, "val": 0.0}, torch.Generator())
    assert [len(tiny[p]) for p in ("test", "val", "train")] == [1, 0, 2]  # at least one if > 0
    with pytest.raises(ValueError, match="none left to train on"):
        dwp.vae.split_kernels(kernels[:2], {"test": 0.4, "val": 0.4}, torch.Generator())
    with pytest.raises(ValueError, match=r"val must be in \[0, 1\)"):
        dwp.vae.split_kernels(kernels, {"val": 1.0}, torch.Generator())


def test_given_validation_kernels_are_used_as_they_are():
    kernels, _ = linear_gaussian_bank(300)
    train, val = kernels[:250], kernels[250:]
    fit = fit_kernel_vae(train, val_kernels=val, hidden=8, epochs=2, progress=False)
    assert (fit.n_train, fit.n_val) == (250, 50)
    assert fit.baselines == dwp.vae.gaussian_baselines(train, val)  # scored on val as given
    with pytest.raises(ValueError, match="val_kernels"):
        fit_kernel_vae(train, val_kernels=torch.zeros(0, 3, 3), epochs=1, progress=False)
    with pytest.raises(ValueError, match="val_kernels"):
        fit_kernel_vae(train, val_kernels=torch.zeros(4, 3, 2), epochs=1, progress=False)


# -- the device option ----------------------------------------------------------------------
def test_default_and_explicit_cpu_device_fit_the_same_vae_bitwise():
    fits = [_small_fit(0, epochs=2), _small_fit(0, epochs=2, device="cpu")]
    fits.append(_small_fit(0, epochs=2, device=torch.device("cpu")))
    reference = fits[0].vae.state_dict()
    for fit in fits[1:]:
        state = fit.vae.state_dict()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
        assert fit.history == fits[0].history and fit.baselines == fits[0].baselines
    assert all(p.device.type == "cpu" for p in fits[1].vae.parameters())


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", r"^device 'gpu' is not a torch device"),
        (f"cuda:{torch.cuda.device_count()}", r"is not available on this machine \(available: cpu"),
    ],
)  # fmt: skip
def test_a_bad_device_is_rejected_before_any_work(monkeypatch, device, message):
    def no_svi(*args, **kwargs):
        raise AssertionError("the fit started")

    monkeypatch.setattr(dwp.vae, "SVI", no_svi)
    kernels, _ = linear_gaussian_bank(20)
    with pytest.raises(ValueError, match=message):
        fit_kernel_vae(kernels, epochs=1, progress=False, device=device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_fit_on_cuda_stays_there_with_the_cpu_fit_s_split_and_baselines():
    cpu = _small_fit(0, epochs=1)
    cuda = _small_fit(0, epochs=1, device="cuda")
    assert all(p.device.type == "cuda" for p in cuda.vae.parameters())
    assert (cuda.n_train, cuda.n_val) == (cpu.n_train, cpu.n_val)
    assert cuda.baselines == cpu.baselines  # computed on the CPU either way
    assert math.isfinite(cuda.best_val_elbo)
