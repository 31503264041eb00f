"""``dwp fit-prior``: the command line makes the prior the Python API makes, for every kind,
with its report and figure, and refuses bad input with one ``error:`` line and status 2,
leaving nothing behind."""

import contextlib
import io
import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_nets import assert_same_bank, net2d
from torch import nn

import dwp
from dwp.cli import build_parser, fit_prior, main
from dwp.cli.fit_prior_options import check
from dwp.cli.kinds import KINDS
from dwp.priors import held_out_scores, load_prior, split_bank, weight_scores
from dwp.priors.files import prior_kinds

ROOT = Path(__file__).resolve().parents[1]
#: a small, quick VAE fit (the numbers do not matter, only that both paths agree)
VAE_OPTIONS = {"epochs": 2, "hidden": 8, "latent_dim": 2, "batch_size": 16, "iwae_samples": 4}
VAE_FLAGS = ["--epochs", "2", "--hidden", "8", "--latent-dim", "2", "--batch-size", "16"]
VAE_FLAGS += ["--iwae-samples", "4"]


def run(*argv: object) -> tuple[int, str, str]:
    """``dwp`` in this process: (exit status, stdout, stderr); argparse's exits included."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(a) for a in argv])
        except SystemExit as exit_:
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


def fit(*argv: object) -> tuple[int, str, str]:
    """``dwp fit-prior ARGV`` in this process."""
    return run("fit-prior", *argv)


def write_sources(folder: Path) -> list[Path]:
    """Three Net2d state-dict files, in the three layouts collect_kernels reads."""
    paths = []
    for seed, wrap in enumerate((lambda s: s, lambda s: {"model": s}, lambda s: {"state_dict": s})):
        path = folder / f"src{seed}.pt"
        torch.save(wrap(net2d(seed).state_dict()), path)
        paths.append(path)
    return paths


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, sb[key]), key
        else:
            assert value == sb[key], key


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# -- the deep weight prior: one fit on the command line, one in Python ----------------------
@pytest.fixture(scope="module")
def dwp_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dwp")
    sources = write_sources(folder)
    status, stdout, stderr = fit(
        *sources, "--kind", "dwp", "--include", "conv*", "--min-norm", "0.05", "--seed", "3",
        *VAE_FLAGS, "--no-progress", "--bank-out", folder / "bank.pt",
        "--samples-figure", folder / "samples.png",
        "--out", folder / "prior.pt",
    )  # fmt: skip
    assert status == 0, stderr
    bank = dwp.collect_kernels(sources, include=["conv*"], min_norm=0.05)
    prior = dwp.DeepWeightPrior.fit(bank, seed=3, progress=False, **VAE_OPTIONS)
    return {"folder": folder, "sources": sources, "bank": bank, "prior": prior, "stdout": stdout}


def test_the_dwp_prior_is_the_python_api_s(dwp_run):
    folder, expected = dwp_run["folder"], dwp_run["prior"]
    loaded = load_prior(folder / "prior.pt")
    assert isinstance(loaded, dwp.DeepWeightPrior)
    assert loaded.groups == expected.groups == ["conv1", "conv2"]
    assert_same_state(loaded, expected)
    assert loaded.metadata["held_out"] == expected.metadata["held_out"]
    assert_same_bank(dwp.KernelBank.load(folder / "bank.pt"), dwp_run["bank"])
    kernels = dwp_run["bank"].select("conv2")[:8]
    values = []
    for prior in (loaded, expected):
        torch.manual_seed(0)  # the ELBO is a Monte Carlo estimate: the same draws for both
        values.append(prior.for_group("conv2").log_prob(kernels))
    assert torch.equal(*values)


def test_the_dwp_report_says_what_was_fitted_and_how_well(dwp_run):
    folder, prior, bank = dwp_run["folder"], dwp_run["prior"], dwp_run["bank"]
    report = json.loads((folder / "prior.report.json").read_text())
    assert report["kind"] == "dwp" and report["prior"]["kind"] == "DeepWeightPrior"
    assert report["dwp_version"] == dwp.__version__
    assert report["options"] == {**VAE_OPTIONS, "seed": 3}
    assert list(report["bank"]["groups"]) == bank.group_names
    for group, entry in report["bank"]["groups"].items():
        assert entry["kernels"] == len(bank.select(group))
        assert entry["collected"] == bank.metadata["total"][group] >= entry["kernels"]
        assert entry["layers"] == [group]
    assert report["bank"]["min_norm"] == 0.05
    assert report["held_out"] == prior.metadata["held_out"]  # finite: >= 2 test kernels
    assert set(report["held_out"]["groups"]) == {"conv1", "conv2"}
    assert report["split"] == {"val_fraction": 0.1, "test_fraction": 0.1, "seed": 3}
    markdown = (folder / "prior.report.md").read_text()
    assert prior.fit_report() in markdown and bank.summary() in markdown
    assert markdown == dwp_run["stdout"]
    figures = [folder / "prior.report.png", folder / "samples.png"]
    if fit_prior._has_matplotlib():
        assert all(f.read_bytes().startswith(b"\x89PNG") for f in figures)
        assert report["outputs"]["figure"] == str(figures[0])
        assert report["outputs"]["samples_figure"] == str(figures[1])
    else:
        assert not any(f.exists() for f in figures) and "matplotlib" in report["notes"][0]


def test_the_kernel_gaussian_is_the_api_s_scored_on_the_dwp_test_kernels(dwp_run, tmp_path):
    """From a saved bank, pruned again; its held-out scores are those of the same fit on the
    training kernels of the dwp split, so its Gaussian columns are the dwp report's."""
    status, _, stderr = fit(
        "--bank", dwp_run["folder"] / "bank.pt", "--kind", "kernel-gaussian", "--seed", "3",
        "--min-norm", "0.1", "--out", tmp_path / "gauss.pt",
    )  # fmt: skip
    assert status == 0, stderr
    bank = dwp_run["bank"].prune(0.1)
    expected = dwp.KernelGaussianPrior.fit(bank)
    loaded = load_prior(tmp_path / "gauss.pt")
    assert isinstance(loaded, dwp.KernelGaussianPrior) and loaded.config() == expected.config()
    assert_same_state(loaded, expected)
    kernels = bank.select("conv1")
    assert torch.equal(
        loaded.for_group("conv1").kernel_log_prob(kernels),
        expected.for_group("conv1").kernel_log_prob(kernels),
    )
    report = json.loads((tmp_path / "gauss.report.json").read_text())
    parts = split_bank(bank, seed=3)
    train = {g: p["train"] for g, p in parts.items()}
    by_hand = held_out_scores(
        {
            "kernel Gaussian": dwp.KernelGaussianPrior.fit(train),
            "diagonal Gaussian": dwp.KernelGaussianPrior.fit(train, diagonal=True),
        },
        {g: p["test"] for g, p in parts.items()},
        reference="kernel Gaussian",
    )
    assert report["held_out"] == by_hand
    # the unpruned bank's split is the dwp fit's: the same test kernels, the same scores
    status, _, stderr = fit(
        "--bank", dwp_run["folder"] / "bank.pt", "--kind", "kernel-gaussian", "--seed", "3",
        "--out", tmp_path / "same.pt",
    )  # fmt: skip
    assert status == 0, stderr
    same = json.loads((tmp_path / "same.report.json").read_text())["held_out"]
    dwp_scores = dwp_run["prior"].metadata["held_out"]
    for group in ("conv1", "conv2"):
        for name in ("kernel Gaussian", "diagonal Gaussian"):
            assert (
                same["groups"][group]["scores"][name] == dwp_scores["groups"][group]["scores"][name]
            )


# -- the other kinds ------------------------------------------------------------------------
def test_every_fittable_prior_class_has_a_kind():
    classes = {
        cls
        for cls in prior_kinds().values()
        if cls.__module__.startswith("dwp.") and not cls.__name__.endswith("SitePrior")
    }
    assert classes == {kind.cls for kind in KINDS.values()}


def test_groups_from_patterns(tmp_path):
    sources = write_sources(tmp_path)
    status, _, stderr = fit(
        *sources, "--kind", "kernel-gaussian", "--group", "conv*=convs", "--group", "*=rest",
        "--out", tmp_path / "p.pt",
    )  # fmt: skip
    assert status == 0, stderr
    prior = load_prior(tmp_path / "p.pt")
    assert prior.groups == ["convs", "rest"]
    assert prior.layer_groups == {"conv1": "convs", "conv2": "convs", "up": "rest"}
    report = json.loads((tmp_path / "p.report.json").read_text())
    assert report["bank"]["group_by"] == "callable:--group conv*=convs *=rest"


def _moments(folder: Path) -> tuple[Path, list[Path]]:
    """A SWAG moments file of a small net's trajectory, and two later snapshots."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    moments = dwp.SWAGMoments.for_model(net, 2)
    held_out = []
    for step in range(6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01 * torch.randn_like(p))
        if step < 4:
            moments.update(net)
        else:
            held_out.append(folder / f"held{step}.pt")
            torch.save({"model": net.state_dict()}, held_out[-1])
    moments.save(folder / "swag.pt")
    return folder / "swag.pt", held_out


def test_the_swag_prior_is_the_api_s_and_is_scored_on_held_out_networks(tmp_path):
    moments, held_out = _moments(tmp_path)
    status, _, stderr = fit(
        "--kind", "swag", "--moments", moments, "--held-out", held_out[0],
        "--held-out", held_out[1], "--scale", "2", "--learn-scale", "--out", tmp_path / "s.pt",
    )  # fmt: skip
    assert status == 0, stderr
    expected = dwp.SWAGPrior.from_moments(
        dwp.SWAGMoments.load(moments), scale=2.0, learn_scale=True
    )
    loaded = load_prior(tmp_path / "s.pt")
    assert isinstance(loaded, dwp.SWAGPrior) and loaded.config() == expected.config()
    assert_same_state(loaded, expected)
    report = json.loads((tmp_path / "s.report.json").read_text())
    networks = [torch.load(p)["model"] for p in held_out]
    compared = {
        "SWAG": expected,
        "marginal": expected.marginal(),
        "isotropic": expected.marginal(pooled=True),
    }
    by_hand = weight_scores(compared, networks, ["0.weight", "3.weight"], reference="marginal")
    assert report["held_out"] == by_hand


@pytest.mark.parametrize(
    ("kind", "flags", "expected"),
    [
        ("normal", ["--loc", "0.1", "--scale", "0.5", "--learn-scale"],
         dwp.NormalPrior(0.1, 0.5, learn_scale=True)),
        ("pretrained-normal", ["--scale-factor", "0.2", "--min-scale", "0.01"],
         dwp.PretrainedNormalPrior(scale_factor=0.2, min_scale=0.01)),
        ("log-uniform", ["--max-log-alpha", "4"], dwp.LogUniformPrior(max_log_alpha=4.0)),
    ],
)  # fmt: skip
def test_priors_of_nothing_round_trip(tmp_path, kind, flags, expected):
    status, stdout, stderr = fit("--kind", kind, *flags, "--out", tmp_path / "p.pt")
    assert status == 0, stderr
    loaded = load_prior(tmp_path / "p.pt")
    assert type(loaded) is type(expected) and loaded.config() == expected.config()
    assert_same_state(loaded, expected)
    if kind != "pretrained-normal":  # a template has no centre to score against
        w = torch.linspace(-1.0, 1.0, 9)
        assert torch.equal(loaded.log_prob(w), expected.log_prob(w))
    assert files(tmp_path) == {"p.pt", "p.report.json", "p.report.md"}  # nothing to draw
    assert "## Fit" in stdout


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.pt", "--kind", "dwp"], r"^error: .*missing\.pt: No such file"),
        (["garbage.pt", "--kind", "dwp"], r"^error: .*garbage\.pt: cannot read the checkpoint"),
        (["src0.pt", "--kind", "dwp", "--include", "enc*"], r"^error: include patterns \['enc\*'\]"),
        (["src0.pt", "--kind", "dwp", "--kernel-shape", "7x7"], r"^error: no conv layer with kernel shape \(7, 7\)"),
        (["src0.pt", "--kind", "kernel-gaussian", "--min-norm", "9"], r"^error: group 'conv1': need at least 2 kernels"),
        (["src0.pt", "--kind", "dwp", "--epochs", "0"], r"argument --epochs: must be a positive integer"),
        (["src0.pt", "--kind", "dwp", "--val-fraction", "nan"], r"argument --val-fraction: must be a finite"),
        (["src0.pt", "--kind", "kernel-gaussian", "--epochs", "3"], r"--epochs does not apply to --kind kernel-gaussian"),
        (["src0.pt", "--kind", "gauss"], r"argument --kind: invalid choice: 'gauss'"),
        (["src0.pt", "--kind", "swag"], r"--kind swag takes no SOURCE: .*--moments"),
        (["--kind", "dwp"], r"--kind dwp needs SOURCE .* or --bank"),
        (["src0.pt", "--kind", "dwp", "--group-by", "resolution"], r"--group-by resolution needs a forward pass"),
        (["src0.pt", "--kind", "dwp", "--group", "c*=a"], r"^error: layer 'up' matches no --group pattern"),
        (["--bank", "src0.pt", "--kind", "dwp"], r"^error: .*src0\.pt: not a dwp kernel bank file"),
        (["src0.pt", "--kind", "dwp", "--test-fraction", "0", "--figure", "f.png"], r"--test-fraction 0 holds out nothing"),
        (["src0.pt", "--kind", "dwp", "--report", "x/r.json"], r"^error: x: output folder does not exist"),
    ],
)  # fmt: skip
def test_bad_input_is_one_error_line_and_leaves_nothing(tmp_path, monkeypatch, argv, message):
    write_sources(tmp_path)
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage, not a torch file\xff" * 10)
    before = files(tmp_path)
    monkeypatch.chdir(tmp_path)
    status, _, stderr = fit(*argv, "--out", "prior.pt", "--no-progress")
    assert status == 2
    last = stderr.strip().splitlines()[-1]
    assert re.search(message, last), stderr
    if last.startswith("error: "):  # the library's errors: exactly one line, no traceback
        assert [ln for ln in stderr.splitlines() if not ln.startswith("dwp fit-prior: ")] == [last]
    assert files(tmp_path) == before  # no prior, no report, no temporary file


def test_an_existing_output_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "prior.pt"
    out.write_bytes(b"keep me")
    status, _, stderr = fit("--kind", "normal", "--out", out)
    assert status == 2 and stderr == f"error: {out}: exists; pass --overwrite to replace it\n"
    assert out.read_bytes() == b"keep me" and files(tmp_path) == {"prior.pt"}
    (tmp_path / "prior.report.md").write_text("old report")  # any output, not only OUT
    status, _, stderr = fit("--kind", "normal", "--out", tmp_path / "other.pt", "--report",
                            tmp_path / "prior.report.json")  # fmt: skip
    assert status == 2 and "prior.report.md: exists" in stderr
    status, _, stderr = fit("--kind", "normal", "--out", out, "--overwrite")
    assert status == 0, stderr
    assert isinstance(load_prior(out), dwp.NormalPrior)


def test_a_failed_write_removes_what_the_run_wrote(tmp_path, monkeypatch):
    def full_disk(self, path):
        raise OSError(28, f"could not write {path}: No space left on device")

    monkeypatch.setattr(dwp.NormalPrior, "save", full_disk)
    status, _, stderr = fit("--kind", "normal", "--out", tmp_path / "prior.pt")
    assert status == 2 and "No space left on device" in stderr
    assert files(tmp_path) == set()  # the report written before the prior is gone too


def test_the_figure_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(fit_prior, "_has_matplotlib", lambda: False)
    sources = write_sources(tmp_path)
    status, stdout, stderr = fit(*sources, "--kind", "kernel-gaussian", "--out", tmp_path / "p.pt")
    assert status == 0, stderr
    assert not (tmp_path / "p.report.png").exists()
    report = json.loads((tmp_path / "p.report.json").read_text())
    assert report["notes"] == ["no figure: matplotlib is not installed (pip install 'dwp[plot]')"]
    assert "matplotlib is not installed" in stdout
    assert all(math.isfinite(v["mean"]) for v in report["held_out"]["overall"]["scores"].values())


def test_version():
    status, stdout, _ = run("--version")
    assert status == 0 and stdout.strip() == f"dwp (dwp {dwp.__version__})"


def test_python_m_dwp_fit_prior_help():
    result = subprocess.run(
        [sys.executable, "-m", "dwp", "fit-prior", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "usage: dwp fit-prior [SOURCE ...] --kind KIND --out OUT" in result.stdout
    for kind in KINDS:
        assert f"\n  {kind} " in result.stdout


def test_the_readme_commands_parse():
    """The README's `dwp fit-prior` examples are valid command lines (not run: no files)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Fitting a prior from the command line: `dwp fit-prior`")[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [
        shlex.split(command)
        for command in block.replace("\\\n", " ").splitlines()
        if command.startswith("dwp ")
    ]
    assert len(commands) == 3
    for command in commands:
        args = build_parser().parse_args(command[1:])
        check(args, KINDS[args.kind])  # usage errors would exit


# -- --device ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "gpu"], r"^dwp fit-prior: error: --device 'gpu' is not a torch device \(e\.g\. 'cpu'"),
        (["--device", f"cuda:{torch.cuda.device_count()}"],
         r"^dwp fit-prior: error: --device 'cuda:\d+' is not available on this machine \(available: cpu"),
        (["--device", "meta"], r"^dwp fit-prior: error: --device 'meta' is not supported"),
        (["--kind", "kernel-gaussian", "--device", "cpu"],
         r"error: --device does not apply to --kind kernel-gaussian \(it applies to dwp\)$"),
    ],
)  # fmt: skip
def test_a_bad_device_is_one_usage_error_before_anything_is_read(tmp_path, argv, message):
    # the SOURCE does not exist: the device is checked before any file is touched
    kind = [] if "--kind" in argv else ["--kind", "dwp"]
    status, stdout, stderr = fit(tmp_path / "missing.pt", *kind, *argv, "--out", tmp_path / "p.pt")
    assert status == 2 and stdout == ""
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.search(message, errors[0]), stderr
    assert files(tmp_path) == set()


def test_device_cpu_fits_the_prior_that_no_device_fits(dwp_run, tmp_path):
    status, _, stderr = fit(
        *dwp_run["sources"], "--kind", "dwp", "--include", "conv*", "--min-norm", "0.05",
        "--seed", "3", *VAE_FLAGS, "--no-progress", "--device", "cpu",
        "--out", tmp_path / "prior.pt",
    )  # fmt: skip
    assert status == 0, stderr
    loaded, expected = load_prior(tmp_path / "prior.pt"), dwp_run["prior"]
    assert_same_state(loaded, expected)
    assert loaded.metadata["held_out"] == expected.metadata["held_out"]
    report = json.loads((tmp_path / "prior.report.json").read_text())
    assert report["options"]["device"] == "cpu"  # the run's record says where it ran
    status, stdout, _ = run("fit-prior", "--help")
    help_text = " ".join(stdout.split())  # whatever the terminal width
    assert status == 0 and "--device DEVICE" in help_text and "(default cpu)" in help_text
