"""Sliding-window inference: shapes, probabilities, MC uncertainty, test-time augmentation,
NIfTI output, errors, progress bars (and ``unet3d predict --progress``)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import cohorts
import dwp
import unet3d.checkpoint
import unet3d.inference
from unet3d import UNet3D, cli
from unet3d.cases import Case, DataError
from unet3d.data import load_decathlon
from unet3d.inference import (
    VolumePrediction,
    flip_combinations,
    predict_case,
    predict_volume,
    predict_volume_tta,
)

pytest.importorskip("monai")

WIDTHS = (2, 4, 4, 8)
ODD = (20, 28, 36)  # no axis divisible by 8


def tiny(n_classes: int = 2, in_channels: int = 1, seed: int = 0) -> UNet3D:
    torch.manual_seed(seed)
    return UNet3D(in_channels, n_classes, widths=WIDTHS)


def bayesian(seed: int = 0) -> torch.nn.Module:
    return dwp.bayesianize(tiny(seed=seed), init_log_sigma=0.0)


def volume(shape=ODD, channels: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((channels, *shape), generator=g)


def test_odd_shapes_and_probabilities():
    model = tiny(n_classes=3)
    pred = predict_volume(model, volume(), roi_size=16, overlap=0.25)
    assert isinstance(pred, VolumePrediction)
    assert pred.probabilities.shape == (3, *ODD)
    assert pred.mask.shape == pred.mutual_information.shape == ODD
    assert pred.predictive_entropy.shape == ODD
    assert torch.allclose(pred.probabilities.sum(0), torch.ones(ODD), atol=1e-5)
    assert torch.equal(pred.mask, pred.probabilities.argmax(0))
    assert pred.foreground.shape == ODD


def test_deterministic_zero_mi_and_repeatable():
    model = tiny()
    x = volume()
    a = predict_volume(model, x, n_samples=4, roi_size=16, overlap=0.25)
    b = predict_volume(model, x, n_samples=4, roi_size=16, overlap=0.25)
    assert a.n_samples == 1
    assert torch.count_nonzero(a.mutual_information) == 0
    assert torch.equal(a.probabilities, b.probabilities)
    assert (a.predictive_entropy >= 0).all()


def test_single_window_equals_forward_pass():
    model = tiny().eval()
    x = volume((16, 16, 16))
    pred = predict_volume(model, x, roi_size=16)
    direct = model(x[None]).softmax(1)[0]
    assert torch.allclose(pred.probabilities, direct, atol=1e-5)


def test_small_volume_padded_to_window():
    # smaller than the minimum window on every axis: MONAI pads, maps come back cropped
    pred = predict_volume(tiny(), volume((5, 9, 13)), roi_size=64)
    assert pred.probabilities.shape == (2, 5, 9, 13)


def test_bayesian_mi_and_mean_differs_from_mean_weights():
    model = bayesian()
    x = volume()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    pred = predict_volume(model, x, n_samples=3, roi_size=16, overlap=0.25, seed=0)
    assert pred.n_samples == 3
    assert (pred.mutual_information >= 0).all()
    assert pred.mutual_information.max() > 1e-4
    assert torch.allclose(pred.probabilities.sum(0), torch.ones(ODD), atol=1e-5)
    # the posterior means are put back after the weight samples
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k
    means = predict_volume(model, x, n_samples=3, roi_size=16, overlap=0.25, sample=False)
    assert means.n_samples == 1
    assert torch.count_nonzero(means.mutual_information) == 0
    assert not torch.allclose(pred.probabilities, means.probabilities, atol=1e-3)
    # sample=False is the deterministic twin's prediction
    twin = predict_volume(dwp.to_deterministic(model), x, roi_size=16, overlap=0.25)
    assert torch.allclose(twin.probabilities, means.probabilities, atol=1e-5)
    # a seed makes Bayesian predictions repeatable without touching the global RNG
    state = torch.get_rng_state()
    again = predict_volume(model, x, n_samples=3, roi_size=16, overlap=0.25, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(again.probabilities, pred.probabilities)


def test_one_weight_sample_per_pass():
    # a pass is one network: with one window per pass the result is that network's output,
    # so two windows covering the same voxels within one pass agree exactly
    model = bayesian()
    x = volume((16, 16, 16)).repeat(1, 2, 1, 1)  # two identical halves along D
    pred = predict_volume(model, x, n_samples=1, roi_size=16, overlap=0.0, seed=1)
    assert torch.allclose(pred.probabilities[:, :16], pred.probabilities[:, 16:], atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_mode_restored(training):
    for model in (tiny(), bayesian()):
        model.train(training)
        predict_volume(model, volume(), n_samples=2, roi_size=16, overlap=0.0)
        assert all(m.training == training for m in model.modules())
        for layer in model.modules():
            if isinstance(layer, dwp.BayesianLayer):
                assert layer.mode is dwp.Mode.AUTO


def test_errors():
    model = tiny()
    x = volume((16, 16, 16))
    with pytest.raises(ValueError, match="n_samples"):
        predict_volume(model, x, n_samples=0, roi_size=16)
    for roi in (12, (16, 16, 20), 8, (16, 16)):
        with pytest.raises(ValueError, match="roi_size"):
            predict_volume(model, x, roi_size=roi)
    with pytest.raises(ValueError, match="3 classes are expected"):
        predict_volume(model, x, roi_size=16, n_classes=3)
    with pytest.raises(ValueError, match=">= 2"):
        predict_volume(tiny(n_classes=1), x, roi_size=16)
    with pytest.raises(ValueError, match="channels, the model takes 1"):
        predict_volume(model, volume((16, 16, 16), channels=2), roi_size=16)
    with pytest.raises(ValueError, match=r"\(C, D, H, W\)"):
        predict_volume(model, x[0], roi_size=16)
    with pytest.raises(ValueError, match="overlap"):
        predict_volume(model, x, roi_size=16, overlap=1.0)
    assert model.training  # restored even when an error was raised inside


# ---------------------------------------------------------------------------- test-time flips


class _Ramp(torch.nn.Module):
    """Foreground logit ``3 x + ramp(D)``: flip-equivariant along H and W (each voxel on
    its own), not along D (a position-dependent bias within the window)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-2.0, 2.0, x.shape[2]).view(1, 1, -1, 1, 1)
        return torch.cat([torch.zeros_like(x), self.scale * x + ramp], dim=1)


def test_tta_of_a_flip_equivariant_model_is_its_plain_prediction():
    pointwise = torch.nn.Conv3d(1, 2, 1)  # each voxel on its own: equivariant to any flip
    x = volume()  # ODD: several windows, MONAI's padding
    plain = predict_volume(pointwise, x, roi_size=16, overlap=0.25)
    tta = predict_volume_tta(pointwise, x, roi_size=16, overlap=0.25)
    assert tta.n_samples == 8  # every combination of the three axes
    assert torch.allclose(tta.probabilities, plain.probabilities, atol=1e-6)
    assert torch.equal(tta.mask, plain.mask)
    assert tta.mutual_information.max() < 1e-6  # the flips agree
    assert torch.allclose(tta.predictive_entropy, plain.predictive_entropy, atol=1e-5)
    # _Ramp is equivariant to flips of H and W only
    assert torch.allclose(
        predict_volume_tta(_Ramp(), x, flips=(1, 2), roi_size=32).probabilities,
        predict_volume(_Ramp(), x, roi_size=32).probabilities,
        atol=1e-6,
    )


def test_tta_undoes_its_flips():
    # one window: a pass is one forward; by hand: the mean of flip(softmax(f(flip(x))))
    model, x = _Ramp(), volume((16, 16, 16))
    tta = predict_volume_tta(model, x, flips=(0, 2), roi_size=16)
    with torch.no_grad():
        by_hand = torch.stack(
            [
                model(x.flip(axes)[None]).softmax(1)[0].flip(axes)
                for axes in ([], [1], [3], [1, 3])  # the spatial axes 0, 2 of (C, D, H, W)
            ]
        ).mean(0)
    assert tta.n_samples == 4
    assert torch.allclose(tta.probabilities, by_hand, atol=1e-6)
    # the D-flipped prediction disagrees with the plain one, and only through D's ramp
    assert tta.mutual_information.max() > 1e-3
    plain = predict_volume(model, x, roi_size=16).probabilities
    assert not torch.allclose(tta.probabilities, plain, atol=1e-3)


def test_tta_shapes_modes_and_errors():
    model = tiny(n_classes=3)
    model.train()
    pred = predict_volume_tta(model, volume(), flips=(0, 2), roi_size=16, overlap=0.25)
    assert isinstance(pred, VolumePrediction) and pred.n_samples == 4
    assert pred.probabilities.shape == (3, *ODD)
    assert pred.mask.shape == pred.mutual_information.shape == pred.predictive_entropy.shape
    assert pred.mask.shape == ODD
    assert torch.allclose(pred.probabilities.sum(0), torch.ones(ODD), atol=1e-5)
    assert (pred.mutual_information >= 0).all()
    assert model.training  # restored
    # no flip: the plain prediction
    single = predict_volume_tta(model, volume(), flips=(), roi_size=16, overlap=0.25)
    plain = predict_volume(model, volume(), roi_size=16, overlap=0.25)
    assert single.n_samples == 1 and torch.equal(single.probabilities, plain.probabilities)
    # a Bayesian model: its posterior means, and they stay in place
    b = bayesian()
    before = {k: v.detach().clone() for k, v in b.named_parameters()}
    means = predict_volume_tta(b, volume(), flips=(1,), roi_size=16, overlap=0.25)
    twin = predict_volume_tta(
        dwp.to_deterministic(b), volume(), flips=(1,), roi_size=16, overlap=0.25
    )
    assert torch.allclose(means.probabilities, twin.probabilities, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in b.named_parameters())
    assert flip_combinations((2, 0)) == [(), (2,), (0,), (2, 0)]
    for flips in ((3,), (0, 0), (True,), (-1,)):
        with pytest.raises(ValueError, match="flips"):
            predict_volume_tta(model, volume(), flips=flips, roi_size=16)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("tumour")
    cohorts.generate(
        "tumour_target", root, n_train=2, n_test=1, resolution=4, progress=False, whole_tumour=True
    )
    return root


@pytest.mark.parametrize("make", [tiny, bayesian])
def test_predict_case_writes_nifti(cohort, tmp_path, make):
    case = load_decathlon(cohort, "test")[0]
    source = nib.load(case.image)
    model = make()
    paths = predict_case(model, case, tmp_path / "out", n_samples=2, roi_size=32, seed=0)
    assert set(paths) == {"prob", "mask", "mi"}
    expected = {"prob": np.float32, "mask": np.uint8, "mi": np.float32}
    for key, path in paths.items():
        assert path.name == f"{case.id}_{key}.nii.gz"
        img = nib.load(path)
        assert img.shape == source.shape[:3]
        assert np.allclose(img.affine, source.affine)
        assert img.get_data_dtype() == expected[key]
        assert img.header.get_zooms()[:3] == source.header.get_zooms()[:3]
    prob = np.asanyarray(nib.load(paths["prob"]).dataobj)
    mask = np.asanyarray(nib.load(paths["mask"]).dataobj)
    mi = np.asanyarray(nib.load(paths["mi"]).dataobj)
    assert prob.min() >= 0 and prob.max() <= 1
    assert set(np.unique(mask)) <= {0, 1}
    assert np.array_equal(mask == 1, prob > 0.5)
    assert (mi >= 0).all()
    assert (mi.max() > 0) == (make is bayesian)


def test_predict_case_names_the_file_of_an_image_with_other_channels(tmp_path):
    image = tmp_path / "two.nii.gz"
    data = np.random.default_rng(0).normal(size=(16, 16, 16, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), image)
    case = Case("two", image)
    with pytest.raises(
        DataError, match=r"two\.nii\.gz: 2 channel\(s\), the model takes 1.*--modality"
    ):
        predict_case(tiny(), case, tmp_path / "out", roi_size=16)
    assert not (tmp_path / "out").exists()  # nothing written before the check
    paths = predict_case(tiny(), case, tmp_path / "out", roi_size=16, modality=1)
    assert paths["mask"].is_file()
    with pytest.raises(DataError, match="the 2 channel\\(s\\) it was trained on"):
        predict_case(tiny(in_channels=2), case, tmp_path / "out", roi_size=16, modality=0)


# ---------------------------------------------------------------------------------------------
# Progress bars


def _window_bar(err: str) -> bool:
    """Whether stderr holds MONAI's bar over the windows: tqdm's bars start their line with
    ``\\r``; MONAI's has no description, so its percentage comes first."""
    return re.search(r"\r\s*\d+%\|", err) is not None


def _same(a: VolumePrediction, b: VolumePrediction) -> None:
    assert a.n_samples == b.n_samples
    for field in ("probabilities", "mask", "mutual_information", "predictive_entropy"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_progress_changes_no_numbers_and_shows_the_samples(capsys):
    model, x = bayesian(), volume()
    kwargs = {"n_samples": 3, "roi_size": 16, "overlap": 0.25, "seed": 0}
    quiet = predict_volume(model, x, **kwargs)
    assert capsys.readouterr().err == ""  # off by default
    shown = predict_volume(model, x, progress=True, **kwargs)
    err = capsys.readouterr().err
    _same(quiet, shown)
    assert "samples" in err and "3/3" in err
    # several passes: no window bar unless asked (MONAI's would leave a line per pass)
    assert not _window_bar(err)
    windows = predict_volume(model, x, progress=True, window_progress=True, **kwargs)
    err = capsys.readouterr().err
    _same(quiet, windows)
    assert "samples" in err and _window_bar(err)


def test_progress_of_one_pass_shows_the_windows(capsys):
    model, x = tiny(), volume()
    quiet = predict_volume(model, x, n_samples=4, roi_size=16, overlap=0.25)
    capsys.readouterr()
    shown = predict_volume(model, x, n_samples=4, roi_size=16, overlap=0.25, progress=True)
    err = capsys.readouterr().err
    _same(quiet, shown)
    assert "samples" not in err  # one pass: a bar of 1 would say nothing
    assert _window_bar(err)
    predict_volume(model, x, roi_size=16, progress=True, window_progress=False)
    assert capsys.readouterr().err == ""


def test_tta_progress_changes_no_numbers_and_shows_the_flips(capsys):
    model, x = tiny(), volume()
    quiet = predict_volume_tta(model, x, flips=(0, 2), roi_size=16, overlap=0.25)
    capsys.readouterr()
    shown = predict_volume_tta(model, x, flips=(0, 2), roi_size=16, overlap=0.25, progress=True)
    err = capsys.readouterr().err
    _same(quiet, shown)
    assert "flips" in err and "4/4" in err and not _window_bar(err)


def test_predict_case_progress(tmp_path, capsys):
    image = tmp_path / "one.nii.gz"
    data = np.random.default_rng(0).random((20, 18, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), image)
    case = Case("one", image)
    kwargs = {"n_samples": 2, "roi_size": 16, "seed": 0}
    quiet = predict_case(bayesian(), case, tmp_path / "quiet", **kwargs)
    assert capsys.readouterr().err == ""
    shown = predict_case(bayesian(), case, tmp_path / "shown", progress=True, **kwargs)
    assert "samples" in capsys.readouterr().err
    for key in quiet:
        a = np.asanyarray(nib.load(quiet[key]).dataobj)
        b = np.asanyarray(nib.load(shown[key]).dataobj)
        assert np.array_equal(a, b), key


def _predict_cli(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    n_images: int = 1,
    tty: bool = False,
) -> list[dict]:
    """``unet3d predict FLAGS`` over ``n_images`` tiny images, with a stand-in checkpoint
    and a recording ``predict_case``: the keywords of each call."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for i in range(n_images):
        data = np.random.default_rng(i).random((16, 16, 16)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.eye(4)), images / f"s{i}.nii.gz")
    trained = unet3d.checkpoint.TrainedModel(
        model=bayesian(),
        config={"n_classes": 2},
        strategy={"name": "normal_prior"},
        bayesian=True,
        path=tmp_path / "best.pt",
        epoch=0,
    )
    calls: list[dict] = []

    def record(model, case, folder, n_samples, **kwargs):
        calls.append(kwargs)
        return {}

    monkeypatch.setattr(unet3d.checkpoint, "load_model", lambda path: trained)
    monkeypatch.setattr(unet3d.inference, "predict_case", record)
    # capsys's stderr is no terminal; a test of the default on one fakes it
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    argv = ["predict", "--checkpoint", str(tmp_path / "best.pt"), "--input", str(images)]
    status = cli.main([*argv, "--out", str(tmp_path / "out"), "--samples", "2", *flags])
    assert status == 0
    return calls


@pytest.mark.parametrize(
    ("flags", "tty", "expected"),
    [
        ([], False, False),  # a log or a pipe: no bars
        ([], True, True),  # a terminal: bars
        (["--progress"], False, True),
        (["--no-progress"], True, False),
    ],
)
def test_cli_progress_flag_reaches_predict_case(
    tmp_path, monkeypatch, capsys, flags, tty, expected
):
    calls = _predict_cli(tmp_path, monkeypatch, flags, tty=tty)
    err = capsys.readouterr().err
    assert [c["progress"] for c in calls] == [expected]
    assert calls[0]["window_progress"] is None  # one image: the window bar of a single pass
    assert (re.search(r"predict:\s+\d+%\|", err) is not None) == expected  # over the images


def test_cli_progress_leaves_the_window_bar_out_over_several_images(tmp_path, monkeypatch):
    calls = _predict_cli(tmp_path, monkeypatch, ["--progress"], n_images=2)
    assert [(c["progress"], c["window_progress"]) for c in calls] == [(True, False)] * 2
