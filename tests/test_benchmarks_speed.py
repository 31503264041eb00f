"""Smoke tests of the speed benchmark.

Wall times depend on the machine, so nothing here asserts a timing value: only that the
benchmark runs end to end and writes well-formed results.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import dwp
from benchmarks import speed
from benchmarks.speed.kl import GAUSSIAN_KL_TARGET
from unet3d import UNet3D, count_kernels, kernel3_layers
from unet3d.strategies import STRATEGIES

VARIANTS = {
    "layers": ["deterministic", *speed.LAYER_TARGETS],
    "kl": [
        "step_unet3d",
        "kl_mlp_1vae",
        "kl_mlp_1vae_own",
        "kl_mlp_7vae",
        "kl_gauss_1group",
        "kl_gauss_7group",
        "kl_swag_r5",
        "kl_conv_1vae",
        "step_unet3d_wide",
        "kl_mlp_1vae_wide",
        "kl_mlp_1vae_wide_own",
        "kl_mlp_1vae_wide_half",
    ],
    "fit": ["fit_kernel_vae_mlp"],
    "unet3d": [
        *STRATEGIES,
        "infer_deterministic",
        *(f"infer_bayesian_{n}" for n in speed.QUICK.inference_samples),
    ],
    "precision": [
        "random_init off", "random_init bf16", "normal_prior off", "normal_prior bf16",
        "normal_prior bf16 unchecked", "normal_prior kl", "dwp off", "dwp bf16",
        "dwp bf16 unchecked", "dwp kl",
    ],
}  # fmt: skip
HEADINGS = {s: f"## {speed.TITLES[s]}" for s in speed.SECTIONS}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One ``--quick`` run of every section, shared by the tests below (the slow part)."""
    out = tmp_path_factory.mktemp("speed")
    assert speed.main(["--quick", "--seed", "3", "--out", str(out)]) == 0
    return out, json.loads((out / "speed_quick.json").read_text())


def _rows(result: dict, section: str) -> dict[str, dict]:
    return {r["variant"]: r for r in result["rows"] if r["section"] == section}


def test_quick_run_writes_one_json_and_one_markdown(quick_run: tuple[Path, dict]) -> None:
    out, result = quick_run
    assert sorted(p.name for p in out.iterdir()) == ["speed_quick.json", "speed_quick.md"]
    markdown = (out / "speed_quick.md").read_text()
    assert "QUICK" in markdown
    positions = [markdown.index(HEADINGS[s]) for s in speed.SECTIONS]
    assert positions == sorted(positions)  # one table per section, in order
    assert (
        "| variant | median step (s) | IQR | ratio vs deterministic | target | met? |" in markdown
    )
    assert "| ratio vs step | target | met? |" in markdown
    assert "| epochs run | wall (s) |" in markdown
    assert "| strategy | median step (s) | IQR | ratio vs random_init |" in markdown
    assert "| peak RSS above model + input (MiB) |" in markdown
    assert "python -m benchmarks.speed --quick --seed 3 --out" in markdown
    assert result["command"].startswith("python -m benchmarks.speed --quick")


def test_quick_run_records_config_and_environment(quick_run: tuple[Path, dict]) -> None:
    _, result = quick_run
    config = result["config"]
    assert config["quick"] is True
    assert config["seed"] == 3
    assert config["sections"] == list(speed.SECTIONS)
    assert config["steps"] == speed.QUICK.steps
    assert config["size"] == speed.QUICK.size
    assert config["layers"]["network"] == "unet3d.UNet3D"
    assert config["layers"]["widths"] == list(speed.QUICK.widths)
    assert config["layers"]["targets"] == speed.LAYER_TARGETS
    assert config["kl"]["heavy_reps"] == speed.QUICK.heavy_reps
    fit = config["fit"]["options"]
    assert fit["epochs"] == speed.QUICK.fit_epochs and fit["seed"] == 3
    assert fit["early_stopping"] > fit["epochs"] and fit["min_lr"] == 0.0
    assert set(config["section_wall_s"]) == set(speed.SECTIONS)
    # the noise indicator for the unrepeated fit (None where /proc/stat is missing)
    for cores in config["other_processes_cores"].values():
        assert cores is None or cores >= 0
    assert result["environment"]["torch"] == torch.__version__
    assert {"python", "platform", "num_threads", "git_commit"} <= result["environment"].keys()


def test_every_row_has_numbers_ratio_and_target(quick_run: tuple[Path, dict]) -> None:
    _, result = quick_run
    assert [r["section"] for r in result["rows"]] == [
        s for s in speed.SECTIONS for _ in VARIANTS[s]
    ]
    for section, names in VARIANTS.items():
        assert list(_rows(result, section)) == names
    for row in result["rows"]:
        assert row["median_s"] > 0 and all(t > 0 for t in row["times_s"])
        assert len(row["times_s"]) == row["reps"]
        assert row["ratio"] > 0
        assert {"baseline", "target_ratio", "met"} <= row.keys()
        if row["target_ratio"] is None:
            assert row["met"] is None
        else:
            assert row["met"] == (row["ratio"] <= row["target_ratio"])


def test_layer_rows(quick_run: tuple[Path, dict]) -> None:
    _, result = quick_run
    rows = _rows(result, "layers")
    n_bayesian = len(kernel3_layers(UNet3D(widths=speed.QUICK.widths)))
    for name, row in rows.items():
        assert len(row["times_s"]) == speed.QUICK.steps
        assert row["iqr_s"] >= 0 and row["saved_for_backward_mib"] > 0
        assert row["baseline"] == "deterministic"
        if name == "deterministic":
            assert row["ratio"] == 1.0 and row["target_ratio"] is None
            assert row["bayesian_layers"] == 0
        else:
            assert row["target_ratio"] == speed.LAYER_TARGETS[name]
            assert row["bayesian_layers"] == n_bayesian
            # a silently failed bayesianize would still time fine; the log-sigmas give it away
            assert row["parameters"] > rows["deterministic"]["parameters"]


def test_kl_rows(quick_run: tuple[Path, dict]) -> None:
    _, result = quick_run
    rows = _rows(result, "kl")
    kernels = count_kernels(UNet3D(widths=speed.QUICK.widths))
    wide_kernels = count_kernels(UNet3D(widths=speed.QUICK.wide_widths))
    for name in ("step_unet3d", "step_unet3d_wide"):
        assert rows[name]["baseline"] == name and rows[name]["ratio"] == 1.0
        assert rows[name]["target_ratio"] is None
    for name in ("kl_mlp_1vae", "kl_mlp_7vae", "kl_conv_1vae"):
        assert rows[name]["baseline"] == "step_unet3d"
        assert rows[name]["kernels"] == kernels
    assert rows["kl_mlp_1vae_wide"]["baseline"] == "step_unet3d_wide"
    assert (
        rows["kl_mlp_1vae_wide"]["kernels"] == wide_kernels == rows["step_unet3d_wide"]["kernels"]
    )
    for name in ("kl_mlp_1vae", "kl_mlp_7vae", "kl_mlp_1vae_wide"):
        assert rows[name]["architecture"] == "mlp"
        assert rows[name]["target_ratio"] == speed.KL_TARGET
    assert rows["kl_conv_1vae"]["architecture"] == "conv"
    assert rows["kl_conv_1vae"]["target_ratio"] is None  # reported without a target
    assert rows["kl_mlp_7vae"]["vaes"] == len(rows["kl_mlp_7vae"]["groups"]) == 7
    for name, n_groups in (("kl_gauss_1group", 1), ("kl_gauss_7group", 7)):
        assert rows[name]["baseline"] == "step_unet3d" and rows[name]["kernels"] == kernels
        assert rows[name]["gaussians"] == n_groups
        assert rows[name]["target_ratio"] == GAUSSIAN_KL_TARGET
    swag = rows["kl_swag_r5"]
    assert swag["baseline"] == "step_unet3d" and swag["kernels"] == kernels
    assert swag["prior"] == "SWAG rank 5" and swag["target_ratio"] == GAUSSIAN_KL_TARGET
    assert sum(rows["kl_mlp_7vae"]["groups"].values()) == kernels
    for name in ("kl_conv_1vae", "step_unet3d_wide"):
        assert rows[name]["reps"] == speed.QUICK.heavy_reps
    assert rows["kl_mlp_1vae"]["reps"] == speed.QUICK.steps
    for row in rows.values():
        assert row["saved_for_backward_mib"] > 0


def test_fit_row(quick_run: tuple[Path, dict]) -> None:
    _, result = quick_run
    (row,) = _rows(result, "fit").values()
    assert row["kernels"] == speed.QUICK.fit_kernels == row["n_train"] + row["n_val"]
    assert row["epochs_run"] == row["epochs_requested"] == speed.QUICK.fit_epochs
    assert row["target_s"] == speed.FIT_TARGET_S
    assert row["ratio"] == pytest.approx(row["median_s"] / speed.FIT_TARGET_S)
    assert "other_processes_cores" in row and "noisy" in row


def test_unet3d_rows(quick_run: tuple[Path, dict]) -> None:
    _, result = quick_run
    rows = _rows(result, "unet3d")
    steps = {n: r for n, r in rows.items() if r["kind"] == "train_step"}
    assert list(steps) == list(STRATEGIES)
    base = steps["random_init"]
    assert base["ratio"] == 1.0 and base["input_shape"] == [2, 1, *[speed.QUICK.size] * 3]
    for name, row in steps.items():
        assert row["baseline"] == "random_init" and row["target_ratio"] is None
        assert row["reps"] == speed.QUICK.steps and row["saved_for_backward_mib"] > 0
        assert row["bayesian"] == (name in ("normal_prior", "dwp", "prior"))
        if row["bayesian"]:  # log-sigmas (and the dwp encoders) on top of the weights
            assert row["parameters"] > base["parameters"]
        else:
            assert row["parameters"] == base["parameters"]
    frozen = steps["pretrained_frozen"]
    assert 0 < frozen["trainable_parameters"] < frozen["parameters"]

    infer = {n: r for n, r in rows.items() if r["kind"] == "inference"}
    assert infer["infer_deterministic"]["ratio"] == 1.0
    for name, row in infer.items():
        assert row["volume"] == list(speed.QUICK.inference_volume)
        assert row["roi"] == speed.QUICK.inference_roi
        assert row["passes"] == (row["samples"] if row["bayesian"] else 1)
        assert row["peak_rss_mib"] >= row["baseline_rss_mib"] > 0
        assert row["peak_above_baseline_mib"] >= 0 and "VmHWM" in row["memory_method"]
        # the Bayesian passes really sample: their disagreement is the mutual information
        assert (row["mean_mutual_information"] > 0) == (row["samples"] > 1), name


def test_running_one_section_keeps_the_others_results(
    quick_run: tuple[Path, dict], tmp_path: Path
) -> None:
    out, first = quick_run
    for name in ("speed_quick.json", "speed_quick.md"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    assert speed.main(["--quick", "--sections", "fit", "--seed", "4", "--out", str(tmp_path)]) == 0
    merged = json.loads((tmp_path / "speed_quick.json").read_text())
    assert merged["config"]["sections"] == list(speed.SECTIONS)
    assert [r["section"] for r in merged["rows"]] == [r["section"] for r in first["rows"]]
    for section in ("layers", "kl", "unet3d"):  # kept as measured
        assert _rows(merged, section) == _rows(first, section)
        assert merged["config"][section] == first["config"][section]
    assert _rows(merged, "fit") != _rows(first, "fit")  # measured again
    runs = merged["config"]["section_runs"]
    assert runs["fit"]["seed"] == 4 and runs["layers"]["seed"] == 3
    markdown = (tmp_path / "speed_quick.md").read_text()
    assert all(HEADINGS[s] in markdown for s in speed.SECTIONS)
    assert "--sections fit --seed 4" in markdown and "--quick --seed 3" in markdown

    # --replace writes the sections run, and only those
    argv = ["--quick", "--sections", "fit", "--replace", "--out", str(tmp_path)]
    assert speed.main(argv) == 0
    replaced = json.loads((tmp_path / "speed_quick.json").read_text())
    assert replaced["config"]["sections"] == ["fit"]
    assert {r["section"] for r in replaced["rows"]} == {"fit"}


def test_section_selection_and_same_seed_same_computation(
    quick_run: tuple[Path, dict], tmp_path: Path
) -> None:
    _, first = quick_run
    argv = ["--quick", "--sections", "kl,layers", "--seed", "3", "--steps", "2"]
    assert speed.main([*argv, "--out", str(tmp_path)]) == 0
    second = json.loads((tmp_path / "speed_quick.json").read_text())
    assert second["config"]["sections"] == ["layers", "kl"]  # canonical order
    assert "fit" not in second["config"]
    assert {r["section"] for r in second["rows"]} == {"layers", "kl"}
    markdown = (tmp_path / "speed_quick.md").read_text()
    assert HEADINGS["layers"] in markdown and HEADINGS["kl"] in markdown
    assert HEADINGS["fit"] not in markdown
    for section in ("layers", "kl"):
        a, b = _rows(first, section), _rows(second, section)
        assert list(a) == list(b)
        for name in a:
            # the first (warm-up) value depends only on the seed, not on the other
            # sections or on how many rounds follow
            assert a[name]["loss_first"] == pytest.approx(b[name]["loss_first"], rel=1e-5)


def test_parse_args_sections() -> None:
    assert speed.parse_args([]).sections == list(speed.SECTIONS)
    assert speed.parse_args(["--sections", "fit,layers,fit"]).sections == ["layers", "fit"]
    args = speed.parse_args(["--quick", "--sections", "fit"])
    assert args.fit_epochs == speed.QUICK.fit_epochs and args.widths == speed.QUICK.widths


def test_precision_rows(quick_run: tuple[Path, dict]) -> None:
    _, result = quick_run
    rows = _rows(result, "precision")
    for name in ("random_init", "normal_prior", "dwp"):
        full, mixed = rows[f"{name} off"], rows[f"{name} bf16"]
        assert full["baseline"] == "random_init off" and mixed["baseline"] == "random_init bf16"
        # bf16 activations: the tensors kept for backward shrink (the weights stay float32)
        assert mixed["saved_for_backward_mib"] < full["saved_for_backward_mib"]
        assert full["device"] == "cpu" and full["peak_device_mib"] is None  # CUDA's only
        assert full["target_ratio"] is None  # the GPU's targets are not judged on the CPU
    for name in ("normal_prior", "dwp"):  # the KL bound's and the checks' share of a step
        assert rows[f"{name} kl"]["baseline"] == f"{name} bf16"
        assert rows[f"{name} bf16 unchecked"]["baseline"] == f"{name} bf16"
    config = result["config"]["precision"]
    assert config["amp"] == "bf16" and config["input_shape"] == [2, 1, *[speed.QUICK.amp_size] * 3]
    markdown = (quick_run[0] / "speed_quick.md").read_text()
    assert "bf16 speed-up" in markdown and "the ratios are reported, not judged" in markdown


@pytest.mark.parametrize(
    "argv",
    [
        ["--device", "cuda:99"],
        ["--steps", "5"],
        ["--quick", "--steps", "1"],
        ["--quick", "--size", "20"],
        ["--size", "8"],
        ["--batch", "0"],
        ["--threads", "0"],
        ["--sections", "kl,bogus"],
        ["--sections", ""],
        ["--sections", ","],
        ["--bogus"],
    ],
)
def test_rejects_bad_flags(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        speed.parse_args(argv)


def test_busy_note_names_only_disturbed_sections() -> None:
    assert speed.busy_note({"layers": 0.0, "kl": None}) == []
    (note,) = speed.busy_note({"layers": 0.05, "fit": 0.9})
    assert "fit 0.90" in note and "layers" not in note


def test_schedule_spreads_slow_variants_and_rotates() -> None:
    plan = speed.schedule([10, 3, 10], 10)
    assert [len(members) for members in plan].count(3) == 3
    assert sum(1 in members for members in plan) == 3
    assert sum(0 in members for members in plan) == 10
    runs_of_slow = [i for i, members in enumerate(plan) if 1 in members]
    assert runs_of_slow[0] > 0 and runs_of_slow[-1] < 9  # spread, not bunched at one end
    firsts = {members[0] for members in plan}
    assert firsts == {0, 1, 2}  # the starting variant rotates


def test_kl_variants_share_the_forward_sample_unless_named_own(
    quick_run: tuple[Path, dict],
) -> None:
    _, result = quick_run
    kl_rows = {r["variant"]: r for r in result["rows"] if r["section"] == "kl"}
    for name, row in kl_rows.items():
        if name.startswith("kl_") and "architecture" in row:  # the VAE bounds
            assert row["weight_sample"] == ("own" if name.endswith("_own") else "forward's")
        elif name.startswith("kl_"):  # closed forms (Gaussian, SWAG) use no weight sample
            assert row["weight_sample"] == "none (closed form)"


def test_forward_samples_setup_gives_every_layer_a_shared_sample() -> None:
    net = nn.Sequential(nn.Conv3d(1, 2, 3), nn.Conv3d(2, 2, 3))
    model = dwp.bayesianize(net, dwp.DeepWeightPrior({"all": dwp.KernelVAE((3, 3, 3))}))
    layers = [layer for _, layer in dwp.bayesian_layers(model)]
    assert all(layer.weight_posterior.sample is None for layer in layers)
    speed.forward_samples(model)()
    assert all(layer.weight_posterior.sample is not None for layer in layers)
