"""dwp.plot: central slices and the source-vs-prior-samples figure.

The figure must be a valid PNG for 1D, 2D and 3D kernels (central slices of 3D ones),
written atomically (no temporary file left beside it), deterministic in its seed, and a
failure must leave an existing file untouched.  Banks are tiny and their VAEs fitted for one
epoch: the figure's content is not judged here (see ``benchmarks/kernel_figure.py``).
"""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys

import matplotlib
import matplotlib.axes
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn

import dwp
from dwp.plot import central_slice, plot_prior_samples

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _bank_and_prior(dims: int, group_by: str = "layer"):
    """Two nets of two 3^dims convs: layer "0" has 2 x 3 = 6 kernels, layer "1" 2 x 6 = 12."""
    torch.manual_seed(0)
    conv = CONV[dims]
    nets = [nn.Sequential(conv(1, 3, 3), conv(3, 2, 3)) for _ in range(2)]
    bank = dwp.collect_kernels(nets, group_by=group_by)
    prior = dwp.DeepWeightPrior.fit(bank, epochs=1, progress=False, seed=0)
    return bank, prior


@pytest.fixture(scope="module")
def banks() -> dict:
    return {dims: _bank_and_prior(dims) for dims in (1, 2, 3)}


def _read_png(path) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4), image.shape
    return image


# -- central_slice -----------------------------------------------------------------------------
def test_central_slice_of_1d_kernels_is_one_row():
    x = torch.randn(5, 3)
    out = central_slice(x)
    assert out.shape == (5, 1, 3)
    assert torch.equal(out[:, 0], x)


def test_central_slice_of_2d_kernels_is_the_kernels():
    x = torch.randn(5, 3, 4)
    assert torch.equal(central_slice(x), x)


@pytest.mark.parametrize(
    ("shape", "index"), [((5, 3, 3, 3), 1), ((5, 4, 3, 2), 2), ((2, 1, 5, 5), 0)]
)
def test_central_slice_of_3d_kernels_is_the_middle_of_the_first_axis(shape, index):
    x = torch.randn(shape)
    out = central_slice(x)
    assert out.shape == (shape[0], *shape[2:])
    assert torch.equal(out, x[:, index])


@pytest.mark.parametrize("shape", [(5,), (5, 2, 3, 3, 3), ()])
def test_central_slice_rejects_other_shapes(shape):
    with pytest.raises(ValueError, match=r"kernels must be \(N, k\), \(N, a, b\) or"):
        central_slice(torch.zeros(shape))


# -- the figure ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_writes_a_png_that_matplotlib_reads_back(banks, tmp_path, dims):
    bank, prior = banks[dims]
    path = tmp_path / "kernels.png"
    plot_prior_samples(bank, prior, path, n=8)
    height, width, _ = _read_png(path).shape
    assert 0 < height < width  # two rows of 2 x 8 panels
    # atomic: nothing else left in the directory, and readable like a plain open() result
    assert os.listdir(tmp_path) == ["kernels.png"]
    assert os.stat(path).st_mode & stat.S_IRGRP


def test_one_row_per_group(banks, tmp_path):
    bank, prior = banks[2]
    plot_prior_samples(bank, prior, tmp_path / "both.png", n=8)
    plot_prior_samples(bank, prior, tmp_path / "one.png", n=8, groups=["1"])
    both, one = _read_png(tmp_path / "both.png"), _read_png(tmp_path / "one.png")
    assert both.shape[1] == one.shape[1]
    assert both.shape[0] > one.shape[0]


def test_same_seed_same_figure_and_global_rng_untouched(banks, tmp_path):
    bank, prior = banks[2]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    plot_prior_samples(bank, prior, tmp_path / "a.png", n=4, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    plot_prior_samples(bank, prior, tmp_path / "b.png", n=4, seed=0)
    plot_prior_samples(bank, prior, tmp_path / "c.png", n=4, seed=1)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()


def _spy_imshow(monkeypatch) -> list[np.ndarray]:
    """Record every image passed to ``Axes.imshow``, in call order."""
    shown: list[np.ndarray] = []
    imshow = matplotlib.axes.Axes.imshow

    def spy(self, X, *args, **kwargs):
        shown.append(np.asarray(X))
        return imshow(self, X, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy)
    return shown


def test_3d_panels_show_central_slices(banks, tmp_path, monkeypatch):
    bank, prior = banks[3]
    shown = _spy_imshow(monkeypatch)
    n = 4  # both groups (6 and 12 kernels) fill their n source panels
    plot_prior_samples(bank, prior, tmp_path / "k.png", n=n)
    assert len(shown) == 2 * n * len(prior.groups)
    assert all(image.shape == (3, 3) for image in shown)
    for row, group in enumerate(prior.groups):
        slices = central_slice(bank.select(group)).numpy()
        sources = shown[2 * n * row : 2 * n * row + n]
        for image in sources:  # each source panel is the central slice of one of its kernels
            assert np.isclose(slices, image, rtol=0, atol=1e-7).all(axis=(1, 2)).any()
        assert len({image.tobytes() for image in sources}) == n  # distinct kernels


def test_group_smaller_than_n_still_shows_n_prior_samples(banks, tmp_path, monkeypatch):
    bank, prior = banks[2]
    shown = _spy_imshow(monkeypatch)
    n = 8
    plot_prior_samples(bank, prior, tmp_path / "k.png", n=n, groups=["0"])
    assert len(bank.select("0")) == 6
    # 6 source panels (all the group has) and n = 8 prior samples
    assert len(shown) == 6 + n, f"{len(shown)} panels drawn, expected 6 sources + {n} samples"


def test_unknown_group_leaves_an_existing_file_untouched(banks, tmp_path):
    bank, prior = banks[2]
    path = tmp_path / "kernels.png"
    path.write_bytes(b"previous figure")
    with pytest.raises(KeyError, match="nope"):
        plot_prior_samples(bank, prior, path, n=4, groups=["nope"])
    assert path.read_bytes() == b"previous figure"
    assert os.listdir(tmp_path) == ["kernels.png"]


def test_failure_while_writing_leaves_an_existing_file_and_no_temporary_file(
    banks, tmp_path, monkeypatch
):
    bank, prior = banks[2]
    path = tmp_path / "kernels.png"
    path.write_bytes(b"previous figure")

    def broken_replace(src, dst):
        raise OSError("disk full (simulated)")

    # the temporary PNG is complete; moving it over the old file fails
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="simulated"):
        plot_prior_samples(bank, prior, path, n=4)
    monkeypatch.undo()
    assert path.read_bytes() == b"previous figure"
    assert os.listdir(tmp_path) == ["kernels.png"]


def test_failure_does_not_leave_a_figure_open(banks, tmp_path):
    bank, prior = banks[2]
    before = plt.get_fignums()
    with pytest.raises(KeyError):
        plot_prior_samples(bank, prior, tmp_path / "k.png", n=4, groups=["nope"])
    leaked = sorted(set(plt.get_fignums()) - set(before))
    for number in leaked:  # do not let the leak reach later tests
        plt.close(number)
    assert not leaked, "plot_prior_samples left a pyplot figure open after failing"


def test_keeps_the_callers_matplotlib_backend(banks, tmp_path):
    bank, prior = banks[2]
    original = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        plot_prior_samples(bank, prior, tmp_path / "k.png", n=4)
        after = matplotlib.get_backend()
    finally:
        matplotlib.use(original)
    _read_png(tmp_path / "k.png")
    assert after.lower() == "svg", f"plot_prior_samples switched the backend to {after!r}"


def test_plot_is_reachable_as_dwp_plot_after_import_dwp():
    # the package docstring lists dwp.plot.plot_prior_samples as public API; a fresh
    # interpreter, since any earlier `import dwp.plot` in this process sets the attribute
    code = "import dwp; print(dwp.plot.plot_prior_samples.__name__)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "plot_prior_samples"


def test_kernel_figure_script_writes_png_json_and_markdown(tmp_path):
    from benchmarks import kernel_figure

    out = tmp_path / "figure.png"
    argv = ["--seed", "1", "--out", str(out), "--n", "4", "--source-steps", "20", "--epochs", "2"]
    assert kernel_figure.main(argv) == 0
    assert sorted(os.listdir(tmp_path)) == ["figure.json", "figure.md", "figure.png"]
    _read_png(out)
    result = json.loads((tmp_path / "figure.json").read_text())
    assert result["command"] == "python -m benchmarks.kernel_figure " + " ".join(argv)
    assert result["config"]["seed"] == 1
    (row,) = result["rows"]
    assert row["group"] == "all"
    assert 0 < row["kernels"] <= 3 * (8 + 64)  # pruned at --min-norm 0.1
    for key in ("vae_held_out_elbo", "full_gaussian", "diagonal_gaussian", "elbo_prior_samples"):
        assert math.isfinite(row[key]), key
    markdown = (tmp_path / "figure.md").read_text()
    # the fit report scores every prior on test kernels no choice of the fit used
    assert "| group | test kernels | VAE, IWAE bound, K=64 (nats/kernel) |" in markdown
    assert "![source kernels and prior samples](figure.png)" in markdown
