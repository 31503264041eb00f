"""Numerical, device and output failures fail early, leave the weights alone and reach the
``unet3d`` command line as one ``error:`` line with exit status 2 (issue 20, items 5 and 6).

Each test reproduces a reported failure: an infinite KL that let the optimiser write NaN into
the weights, a diverging loss never flagged, ``--lr inf`` accepted, a missing device or an
unwritable ``--out`` found only after the work, a traceback instead of a message, advice
naming an option ``predict`` lacked, a NaN prediction without a word, a benchmark commit
read from the current folder.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from decathlon import write_decathlon
from torch import nn

import dwp
import unet3d.checkpoint
from benchmarks import report
from unet3d import cli
from unet3d.cases import Case, DataError
from unet3d.cli import predict_command
from unet3d.preprocess import check_cases

pytest.importorskip("monai")

WIDTHS = ["--widths", "2", "4", "4", "8"]
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _write_decathlon(root: Path, n_train: int = 2) -> Path:
    return write_decathlon(root, n_train, affine=AFFINE)


def _train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", str(data), "--val-fraction", "0.5", *WIDTHS, "--size", "16",
        "--epochs", "1", "--batch-size", "1", "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = cli.main(argv)
    return status, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    """The last stderr line, checked to be the whole error: no traceback before it."""
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err
    return line


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_decathlon(tmp_path_factory.mktemp("decathlon") / "data")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """A deterministic one-epoch run's ``best.pt`` (single-channel images)."""
    out = tmp_path_factory.mktemp("runs") / "ri"
    assert cli.main(_train_argv(data, out, "--lr", "1e-2")) == 0
    return out / "best.pt"


# ---------------------------------------------------------------------------------------------
# dwp.elbo: a non-finite KL is caught before backward, the weights stay as they were


def _overflowing_net() -> nn.Module:
    # sigma = e^50: sigma^2 overflows float32, so the KL against N(0, 1) is infinite
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    return dwp.bayesianize(net, dwp.NormalPrior(), init_log_sigma=50.0)


def _step(net: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    nll = dwp.likelihoods.gaussian_nll(net.eval()(x), y)  # eval: the posterior means
    terms = dwp.elbo(nll, net, n_data=8, batch_size=4)
    optimizer.zero_grad()
    terms.loss.backward()
    optimizer.step()


def test_an_infinite_kl_raises_before_the_step_and_leaves_the_weights() -> None:
    net = _overflowing_net()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    with pytest.raises(dwp.NonFiniteLossError, match=r"the KL is inf, first at layer '0'"):
        _step(net, optimizer)
    for key, value in net.named_parameters():
        torch.testing.assert_close(value.detach(), before[key], rtol=0, atol=0)


def test_without_the_check_the_same_step_writes_nan_into_the_weights() -> None:
    # The failure the check prevents: validation off, the step corrupts the model and only
    # the next forward pass would notice.
    net = _overflowing_net()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    dwp.set_validation(False)
    try:
        _step(net, optimizer)
    finally:
        dwp.set_validation(True)
    assert not all(torch.isfinite(p).all() for p in net.parameters())
    with pytest.raises(dwp.NonFinitePosteriorError):
        net(torch.randn(1, 3))


def test_a_non_finite_data_term_is_named_with_its_value() -> None:
    net = dwp.bayesianize(nn.Linear(3, 1))
    with pytest.raises(dwp.NonFiniteLossError, match=r"the data term is inf"):
        dwp.elbo(torch.tensor(float("inf")), net, n_data=4, batch_size=2)
    with pytest.raises(FloatingPointError):  # still the type callers caught before
        dwp.elbo(torch.tensor(float("nan")), net, n_data=4, batch_size=2)


# ---------------------------------------------------------------------------------------------
# dwp.LossGuard: a finite loss that diverges is flagged before it overflows


def test_loss_guard_flags_a_diverging_loss_before_it_overflows() -> None:
    # lr 1e-1 on inputs x 1e4: plain SGD on least squares multiplies the error every step
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-1)
    x, y = torch.randn(16, 3) * 1e4, torch.randn(16, 1)
    guard = dwp.LossGuard()
    losses = []
    with pytest.raises(dwp.DivergedLossError, match=r"the loss diverged at step \d+"):
        for step in range(100):
            loss = ((model(x) - y) ** 2).mean()
            losses.append(guard.check(loss, step=step))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert all(np.isfinite(losses))  # stopped while the numbers were still numbers
    assert torch.isfinite(model.weight).all()


def test_loss_guard_lets_a_descent_and_ordinary_noise_pass() -> None:
    guard = dwp.LossGuard(factor=1e6)
    for value in (1e3, 10.0, 1e4, 5e8):  # up to 5e5 times the first: still training
        guard.check(value)
    with pytest.raises(dwp.DivergedLossError):
        guard.check(2e9)
    small = dwp.LossGuard(factor=1e6, floor=1.0)
    small.check(1e-4)  # a fine-tuned network starts near 0: the floor is the reference
    small.check(1e3)
    with pytest.raises(dwp.NonFiniteLossError, match="nan"):
        small.check(float("nan"))
    small.reset()
    assert small.reference is None
    with pytest.raises(ValueError, match="factor"):
        dwp.LossGuard(factor=1.0)


# ---------------------------------------------------------------------------------------------
# The command line


def test_train_with_an_overflowing_initial_scale_is_one_error_line(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = _train_argv(data, out, "--strategy", "normal_prior", "--init-log-sigma", "50")
    status, err = _run(argv, capsys)
    assert status == cli.EXIT_ERROR
    line = _one_error_line(err)
    assert "KL is inf" in line and "initial log-sigma" in line
    assert not (out / "last.pt").exists()  # no checkpoint of corrupted weights


@pytest.mark.parametrize(
    "error",
    [
        dwp.NonFinitePosteriorError("layer 'x': posterior parameter 'weight' has NaN"),
        dwp.NonFiniteLossError("non-finite ELBO: the KL is inf"),
        dwp.DivergedLossError("the loss diverged at step 7"),
        FloatingPointError("overflow"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ],
)
def test_numerical_and_device_failures_are_one_error_line(
    error: Exception,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def fail(args: object) -> int:
        raise error

    monkeypatch.setattr(predict_command, "run", fail)
    argv = ["predict", "--checkpoint", "c.pt", "--input", "i", "--out", str(tmp_path)]
    status, err = _run(argv, capsys)
    assert status == cli.EXIT_ERROR
    line = _one_error_line(err)
    assert str(error).splitlines()[0] in line
    if isinstance(error, torch.OutOfMemoryError):
        assert "--sw-batch-size" in line


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fail(args: object) -> int:
        raise RuntimeError("shape mismatch inside the network")

    monkeypatch.setattr(predict_command, "run", fail)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.main(["predict", "--checkpoint", "c", "--input", "i", "--out", str(tmp_path)])


@pytest.mark.parametrize(
    "flags",
    [
        ["--lr", "inf"],
        ["--lr", "nan"],
        ["--lr", "0"],
        ["--lr", "-1e-3"],
        ["--min-lr", "inf"],
        ["--strategy", "normal_prior", "--scale-lr", "nan"],
        ["--strategy", "normal_prior", "--beta", "nan"],
        ["--strategy", "normal_prior", "--beta", "-1"],
        ["--strategy", "normal_prior", "--init-log-sigma", "inf"],
        ["--ce-weight", "inf"],
        ["--dice-weight", "nan"],
    ],
)
def test_non_finite_numbers_are_usage_errors(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--data", "d", "--out", "o", *flags])
    assert exit_.value.code == 2
    assert f"argument {flags[-2]}" in capsys.readouterr().err


def _fail_if_called(*args: object, **kwargs: object) -> None:
    raise AssertionError("the checkpoint was loaded before the cheap checks")


def test_a_missing_device_is_named_before_any_work(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(unet3d.checkpoint, "load_model", _fail_if_called)
    missing = f"cuda:{torch.cuda.device_count() + 2}"  # cuda:3 on a machine with 1 GPU
    argv = ["predict", "--checkpoint", "c", "--input", "i", "--out", str(tmp_path)]
    status, err = _run([*argv, "--device", missing], capsys)
    assert status == cli.EXIT_ERROR
    line = _one_error_line(err)
    assert f"--device '{missing}' is not available" in line and "available: cpu" in line
    status, err = _run([*argv, "--device", "gpu"], capsys)
    assert status == cli.EXIT_ERROR and "not a torch device" in _one_error_line(err)


@pytest.mark.parametrize("where", ["is_a_file", "under_a_file"])
def test_an_unwritable_out_is_named_before_any_work(
    where: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # (tests run as root here, where permission bits do not stop a write: a file in the
    # way is what makes a folder impossible for anyone)
    monkeypatch.setattr(unet3d.checkpoint, "load_model", _fail_if_called)
    blocker = tmp_path / "taken"
    blocker.write_text("")
    out = blocker if where == "is_a_file" else blocker / "pred"
    argv = ["predict", "--checkpoint", "c", "--input", "i", "--out", str(out)]
    status, err = _run(argv, capsys)
    assert status == cli.EXIT_ERROR
    line = _one_error_line(err)
    assert str(out) in line and "not a folder" in line


def test_predict_creates_a_new_nested_out_folder(
    tmp_path: Path, checkpoint: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "a" / "b"
    argv = ["predict", "--checkpoint", str(checkpoint), "--input", str(data)]
    status, err = _run([*argv, "--out", str(out), "--roi", "16", "--no-progress"], capsys)
    assert status == 0, err
    assert (out / "test0_prob.nii.gz").is_file()


def test_a_two_channel_image_gets_advice_predict_can_follow(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "two.nii.gz"
    volume = np.random.default_rng(1).normal(size=(16, 16, 16, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, AFFINE), image)
    argv = ["predict", "--checkpoint", str(checkpoint), "--input", str(image), "--roi", "16"]
    argv += ["--no-progress"]
    status, err = _run([*argv, "--out", str(tmp_path / "a")], capsys)
    assert status == cli.EXIT_ERROR
    line = _one_error_line(err)
    assert str(image) in line and "2 channel(s), the model takes 1" in line
    assert "unet3d predict --modality K" in line
    # ... and the advice works
    status, err = _run([*argv, "--out", str(tmp_path / "b"), "--modality", "1"], capsys)
    assert status == 0, err
    assert (tmp_path / "b" / "two_mask.nii.gz").is_file()


def _nifti(path: Path, shape: tuple[int, ...]) -> Path:
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype=np.float32), AFFINE), path)
    return path


def test_mixed_3d_and_4d_images_are_named_with_the_real_fix(tmp_path: Path) -> None:
    flat = Case("flat", _nifti(tmp_path / "flat.nii.gz", (8, 8, 8)))
    multi = Case("multi", _nifti(tmp_path / "multi.nii.gz", (8, 8, 8, 2)))
    with pytest.raises(DataError) as error:
        check_cases([flat, multi])
    message = str(error.value)
    assert f"{flat.image}: 1 channel(s)" in message and f"{multi.image}: 2 channel(s)" in message
    assert "--modality K" in message and "common size" not in message
    assert check_cases([flat, multi], modality=0) == 1  # the fix it gives works
    assert check_cases([multi, multi]) == 2


def test_case_files_are_checked_from_their_headers_alone(tmp_path: Path) -> None:
    image = _nifti(tmp_path / "img.nii.gz", (8, 8, 8))
    label = _nifti(tmp_path / "lab.nii.gz", (8, 8, 6))
    missing = tmp_path / "gone.nii.gz"
    for case, named, says in (
        (Case("a", image, label), label, r"label shape \(8, 8, 6\) differs"),
        (Case("b", image, missing), missing, "file not found"),
        (Case("c", _nifti(tmp_path / "2d.nii.gz", (8, 8))), tmp_path / "2d.nii.gz", "3D or 4D"),
    ):
        with pytest.raises(DataError, match=says) as error:
            check_cases([Case("ok", image), case])
        assert str(error.value).startswith(str(named))
    with pytest.raises(DataError, match="modality 1 out of range"):
        check_cases([Case("ok", image)], modality=1)
    masked = Case("m", image, mask=label)  # a brain mask is read for z-scores only
    assert check_cases([masked], normalise="minmax") == 1
    with pytest.raises(DataError, match="mask shape"):
        check_cases([masked], normalise="zscore")


# ---------------------------------------------------------------------------------------------
# dwp.predict and the benchmark report


def test_predict_refuses_non_finite_input_and_output() -> None:
    net = dwp.bayesianize(nn.Linear(3, 2), init_log_sigma=-3.0)
    x = torch.randn(4, 3)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x has 1 NaN and 0 inf values of 12"):
        dwp.predict(net, x, 2, task="classification")

    def overflow(batch: torch.Tensor) -> torch.Tensor:
        return torch.full((batch.shape[0], 2), float("inf"))

    with pytest.raises(FloatingPointError, match="forward pass 1 of 2"):
        dwp.predict(overflow, torch.randn(4, 3), 2, task="regression")
    dwp.set_validation(False)  # the documented way out, for callers that mask NaNs later
    try:
        assert dwp.predict(net, x, 2, task="classification").mean[1].isnan().all()
    finally:
        dwp.set_validation(True)


def test_benchmark_report_records_the_source_commit_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    source = Path(report.__file__).resolve().parent
    done = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip("the benchmarks are not in a git checkout with a commit")
    monkeypatch.chdir(tmp_path)  # not a repository: the old code recorded None ("unknown")
    env = report.environment()
    assert env["git_commit"] == done.stdout.strip()
    assert env["dwp"] == dwp.__version__
    _, markdown = report.write_results("r", {}, [], "| a |\n|---|", tmp_path)
    assert f"dwp {dwp.__version__}" in markdown.read_text()
    assert done.stdout.strip() in markdown.read_text()


def test_benchmark_report_says_when_the_code_differs_from_its_commit(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "code.py").write_text("a = 1\n")
    subprocess.run([*git, "add", "code.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    (repo / "new.py").write_text("untracked: not code that ran\n")
    assert report._git_dirty(repo) is False
    # results and documents are no code: a benchmark writes its figure before its report
    (repo / "benchmarks" / "results").mkdir(parents=True)
    for name in ("benchmarks/results/x.png", "README.md"):
        (repo / name).write_text("committed\n")
        subprocess.run([*git, "add", name], check=True)
    subprocess.run([*git, "commit", "-qm", "outputs"], check=True)
    for name in ("benchmarks/results/x.png", "README.md"):
        (repo / name).write_text("rewritten\n")
    assert report._git_dirty(repo) is False
    (repo / "code.py").write_text("a = 2\n")
    assert report._git_dirty(repo) is True
    assert report._git_dirty(tmp_path / "nowhere") is None
