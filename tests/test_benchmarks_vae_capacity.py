"""benchmarks.vae_capacity: the synthetic banks and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

import dwp
from benchmarks import vae_capacity


def test_edge_kernels_are_seeded_steps_across_the_grid():
    a, b = vae_capacity.edge_kernels(500, seed=3), vae_capacity.edge_kernels(500, seed=3)
    assert a.shape == (500, 3, 3, 3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, vae_capacity.edge_kernels(500, seed=4))
    # noise-free, kernel i is a_i * tanh(.), so no entry exceeds |a_i| ~ 0.1 much
    clean = vae_capacity.edge_kernels(500, noise=0.0, seed=3).flatten(1)
    assert clean.abs().max() < 0.5 and clean.std(0).min() > 0.01  # every entry varies


def test_gaussian_kernels_are_zero_mean_and_correlated():
    k = vae_capacity.gaussian_kernels(20_000, seed=0).flatten(1)
    # the mean of n draws has standard error sd / sqrt(n); 5 standard errors
    assert (k.mean(0).abs() <= 5 * k.std(0) / 20_000**0.5).all()
    corr = torch.corrcoef(k.T)
    off_diagonal = corr[~torch.eye(27, dtype=torch.bool)]
    assert off_diagonal.abs().max() > 0.2  # far beyond sampling noise (~0.007)


def test_main_writes_fit_and_cost_records(tmp_path):
    bank = dwp.collect_kernels(torch.nn.Conv3d(4, 8, 3), group_by="all")
    bank_path = tmp_path / "bank.pt"
    bank.save(bank_path)
    argv = ["--seed", "1", "--kernels", "300", "--epochs", "1", "--hidden", "4", "8"]
    argv += ["--seeds", "1", "--channels", "4", "--reps", "1", "--out", str(tmp_path)]
    assert vae_capacity.main([*argv, "--bank", str(bank_path)]) == 0
    payload = json.loads((tmp_path / "vae_capacity.json").read_text())
    fits = [r for r in payload["rows"] if r["table"] == "fit"]
    costs = [r for r in payload["rows"] if r["table"] == "cost"]
    assert {(r["bank"], r["hidden"]) for r in fits} == {
        (bank_name, h)
        for bank_name in ("edges", "gaussian", f"{tmp_path.name}/bank.pt")
        for h in (4, 8)
    }
    assert all(r["seed"] == 1 and r["epochs_run"] == 1 for r in fits)
    assert [r["hidden"] for r in costs] == [4, 8] and all(r["median_s"] > 0 for r in costs)
    assert payload["command"].startswith("python -m benchmarks.vae_capacity --seed 1")
    table = (tmp_path / "vae_capacity.md").read_text()
    assert "Held-out ELBO" in table and "bound forward + backward" in table


@pytest.mark.parametrize(
    "bad", [["--hidden", "0"], ["--seeds", "0"], ["--bank", "/nonexistent/bank.pt"]]
)
def test_main_rejects_bad_arguments(bad, tmp_path):
    with pytest.raises(SystemExit):
        vae_capacity.main([*bad, "--out", str(tmp_path)])
