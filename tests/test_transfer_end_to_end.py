"""End to end: source nets -> kernel bank -> deep weight prior -> Bayesian target net.

The toy task lives in ``benchmarks/toy.py`` (shared with ``benchmarks/kernel_figure.py``):
denoising 16x16 images of oriented bars.  Three source nets (seeds 0-2, 600 AdamW steps on
512 images) learn smooth bar and blob detectors in their 5x5 kernels; their 216 kernels are
collected from checkpoint files, as a user would, and a kernel VAE is fitted to them.  The
bank and the prior go through ``save`` / ``load``, and the loaded prior is the one the
target net is trained with.

Two Bayesian target nets of the same architecture are then trained on 32 images of a
related task (thicker bars, more noise) by the ELBO with the Gaussian likelihood summed over
pixels, beta = 1, same initial weights, same seed, same 300 steps: one with the deep weight
prior on its 5x5 convs, one with N(0, 1).  The claim of the issue: the DWP net's kernels
move toward the source distribution, i.e. the VAE's ELBO of its posterior means rises
versus the N(0, 1) net's.  The VAE used to score is the prior fitted in memory, never
handed to a network (with ``train_encoder=True`` a network trains its prior's encoder), so
it was not tuned on the kernels it scores; the test checks that it is still equal to the
saved file afterwards.

Margins below were measured with this file's seeds and, to see how much they move, on
three other seed sets (every seed of the pipeline -- source nets, source and target data,
VAE fit, target init and training -- shifted by 10, 20 and 30); each threshold sits well
below the smallest value seen.
Everything runs on one thread (``conftest.py``) in 10-15 s on the 2-core machine.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import dwp
from benchmarks import toy
from dwp.priors.deep import DeepWeightSitePrior
from dwp.vae import gaussian_baselines

N_TARGET = 32
SOURCE_KERNELS = 3 * (8 * 1 + 8 * 8)  # 3 nets, conv 1 -> 8 and conv 8 -> 8, 5x5 each


def _kernels(net: torch.nn.Module) -> torch.Tensor:
    """The 5x5 kernels of a (Bayesian or plain) toy net: the posterior means if Bayesian."""
    return dwp.collect_kernels(net, group_by="all").kernels


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Source nets saved as checkpoints, the bank collected from the files, the prior."""
    directory = tmp_path_factory.mktemp("dwp_transfer")
    nets = toy.train_source_nets(seeds=(0, 1, 2), data_seed=0)
    paths = []
    for i, net in enumerate(nets):
        paths.append(directory / f"source{i}.pt")
        torch.save({"state_dict": net.state_dict()}, paths[-1])
    bank = dwp.collect_kernels(paths, group_by="all", template=toy.make_net(0))
    prior = toy.fit_prior(bank, seed=0)
    bank.save(directory / "bank.pt")
    prior.save(directory / "prior.pt")
    return SimpleNamespace(directory=directory, nets=nets, paths=paths, bank=bank, prior=prior)


@pytest.fixture(scope="module")
def transfer(source: SimpleNamespace) -> SimpleNamespace:
    """The two target nets, trained from the same init, and their scores."""
    bank = dwp.KernelBank.load(source.directory / "bank.pt")
    prior = dwp.DeepWeightPrior.load(source.directory / "prior.pt")
    x, y = toy.make_bars(N_TARGET, seed=1, **toy.TARGET)
    x_val, y_val = toy.make_bars(256, seed=2, **toy.TARGET)
    init = toy.make_net(100)
    init_state = {k: v.clone() for k, v in init.state_dict().items()}

    nets = {
        "normal": toy.train_target(init, dwp.NormalPrior(), x, y, seed=0),
        "dwp": toy.train_target(init, prior, x, y, seed=0),
    }
    kernels = {"init": _kernels(init), **{k: _kernels(net) for k, net in nets.items()}}
    vae = source.prior.vaes["all"]  # fitted in memory, never trained by a target net
    with torch.no_grad():
        mse = {k: float(F.mse_loss(net(x_val), y_val)) for k, net in nets.items()}
    return SimpleNamespace(
        bank=bank,
        prior=prior,
        init=init,
        init_state=init_state,
        nets=nets,
        kernels=kernels,
        # VAE ELBO per kernel (nats), mean of 8 Monte Carlo evaluations
        elbo={k: toy.mean_kernel_elbo(vae, w, n_eval=8, seed=0) for k, w in kernels.items()},
        # an independent density: a full-covariance Gaussian fitted to the source bank
        gauss={k: gaussian_baselines(source.bank.kernels, w)["full"] for k, w in kernels.items()},
        mse=mse,
    )


# -- source side ---------------------------------------------------------------------------
def test_source_nets_learn_the_task_and_the_bank_holds_their_kernels(source):
    x, y = toy.make_bars(256, seed=3, **toy.SOURCE)
    identity = float(F.mse_loss(x, y))  # ~ noise variance 0.49
    with torch.no_grad():
        for net in source.nets:
            # measured: 0.025-0.027 against 0.49 for the noisy input
            assert float(F.mse_loss(net(x), y)) < 0.1 * identity

    bank = source.bank
    assert len(bank) == SOURCE_KERNELS
    assert bank.kernel_shape == (5, 5)
    assert bank.group_names == ["all"]
    assert bank.layer_groups == {"0": "all", "2": "all"}
    assert bank.source_names == [p.name for p in source.paths]
    # the checkpoints hold exactly the trained weights: same bank as from the modules
    from_modules = toy.source_bank(source.nets)
    torch.testing.assert_close(bank.kernels, from_modules.kernels, rtol=0, atol=0)
    assert torch.equal(bank.source, from_modules.source)
    assert torch.equal(bank.layer, from_modules.layer)


def test_prior_learns_structure_beyond_a_diagonal_gaussian(source):
    prior = source.prior
    assert prior.groups == ["all"]
    assert prior.metadata["kernels_per_group"] == {"all": SOURCE_KERNELS}
    fit = prior.metadata["fits"]["all"]
    assert fit["n_train"] + fit["n_val"] + fit["n_test"] == SOURCE_KERNELS
    assert fit["epochs"] >= 30
    # Held-out ELBO per kernel (a lower bound on log p) against a diagonal Gaussian fitted to
    # the same kernels.  Measured: 63.8 vs 46.0 nats here (17.8 apart; 13.9, 23.6 and 5.6 on
    # the other seed sets): the VAE captures the correlations between the pixels of a
    # kernel, i.e. the bar shapes.  Against a full-covariance Gaussian it is +0.4 here but
    # -9.2, -7.4 and +8.8 elsewhere (22 held-out kernels are a noisy score), so that is
    # not asserted.
    assert fit["best_val_elbo"] > fit["baselines"]["diagonal"] + 2.5

    # the report scores the VAE and the Gaussians on the test kernels, which chose nothing
    report = prior.fit_report()
    lines = report.splitlines()
    assert lines[0].startswith("| group | test kernels | VAE, IWAE bound, K=64 (nats/kernel) |")
    assert set(lines[1].replace("|", "")) == {"-"}
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[0] == "all"
    assert cells[1] == str(fit["n_test"])
    vae = prior.metadata["held_out"]["groups"]["all"]["scores"]["VAE"]
    assert cells[2] == f"{vae['mean']:.3f} ± {vae['se']:.3f}"
    assert prior.held_out("all")["vae"] == vae["mean"]


# -- files -----------------------------------------------------------------------------------
def test_bank_and_prior_round_trip_through_files(source, transfer):
    directory: Path = source.directory
    loaded = dwp.KernelBank.load(directory / "bank.pt")
    for name in ("kernels", "group", "source", "layer"):
        assert torch.equal(getattr(loaded, name), getattr(source.bank, name)), name
    for name in ("group_names", "source_names", "layer_names", "layer_groups", "metadata"):
        assert getattr(loaded, name) == getattr(source.bank, name), name

    prior = dwp.DeepWeightPrior.load(directory / "prior.pt")
    assert prior.groups == source.prior.groups
    assert prior.metadata == source.prior.metadata
    assert prior.fit_report() == source.prior.fit_report()
    assert prior.group_of("0") == prior.group_of("2") == "all"
    original, reloaded = source.prior.vaes["all"], prior.vaes["all"]
    assert reloaded.config() == original.config()
    kernels = loaded.kernels[:50]
    assert toy.mean_kernel_elbo(reloaded, kernels, seed=5) == toy.mean_kernel_elbo(
        original, kernels, seed=5
    )

    # bayesianize with the loaded prior: the 5x5 convs get its group's VAE, the head N(0, 1)
    bnn = transfer.nets["dwp"]
    for name in toy.KERNEL_LAYERS:
        site = bnn.get_submodule(name).weight_prior
        assert isinstance(site, DeepWeightSitePrior)
        assert site.group == "all"
        # the network owns a copy (its encoder trained); the decoder is the prior's, frozen
        assert site.vae is not transfer.prior.vaes["all"]
        theirs = transfer.prior.vaes["all"].decoder.state_dict()
        for key, value in site.vae.decoder.state_dict().items():
            assert torch.equal(value, theirs[key]), key
    assert isinstance(bnn.get_submodule("4").weight_prior, dwp.NormalPrior)
    assert torch.isfinite(dwp.kl(bnn))

    # the scoring VAE was never trained by a network: still the saved one
    saved = torch.load(directory / "prior.pt", weights_only=True)["groups"]["all"]["state_dict"]
    current = original.state_dict()
    assert saved.keys() == current.keys()
    for key, value in saved.items():
        assert torch.equal(value, current[key]), key


# -- target side -----------------------------------------------------------------------------
def test_both_target_nets_start_from_the_same_init(transfer):
    # bayesianize copies: training left the shared init untouched
    for key, value in transfer.init.state_dict().items():
        assert torch.equal(value, transfer.init_state[key]), key
    assert torch.equal(transfer.kernels["init"], _kernels(toy.make_net(100)))
    # and both nets have moved away from it
    for label in ("normal", "dwp"):
        assert not torch.allclose(transfer.kernels[label], transfer.kernels["init"])


def test_dwp_moves_target_kernels_toward_the_source_distribution(transfer):
    elbo, gauss = transfer.elbo, transfer.gauss
    # VAE ELBO per kernel of the posterior means, measured with these seeds:
    #   DWP 70.4, N(0, 1) -127.1, init -192.3 (the source bank itself: 64.2) nats.
    # DWP - N(0, 1): 197.5 here, 134.8, 160.5 and 128.8 on the other seed sets; DWP - init:
    # 262.7 here, then 80.6, 572.6 and 67.4.  The thresholds (50 and 25 nats) are below half
    # the smallest value seen; the MC noise of the 8-evaluation mean is far below a nat.
    assert elbo["dwp"] > elbo["normal"] + 50.0, elbo
    assert elbo["dwp"] > elbo["init"] + 25.0, elbo
    # Not only the VAE thinks so: under a full-covariance Gaussian fitted to the source
    # bank the DWP kernels score -549 nats per kernel against -2,570 (N(0, 1)) and -2,284
    # (init); over all four seed sets the gaps to the N(0, 1) and init kernels were at least
    # 2,021 and 1,355 nats.
    assert gauss["dwp"] > gauss["normal"] + 500.0, gauss
    assert gauss["dwp"] > gauss["init"] + 500.0, gauss


def test_dwp_target_net_generalises_better_than_the_normal_prior_net(transfer):
    # Held-out denoising MSE on 256 target images (posterior means), measured: DWP 0.0282,
    # N(0, 1) 0.0318 (ratio 0.89; 0.88, 0.82 and 0.90 on the other seed sets): the source
    # kernels transfer.  The noisy input itself scores 0.64.
    mse = transfer.mse
    assert mse["dwp"] < 0.95 * mse["normal"], mse
