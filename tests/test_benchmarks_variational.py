"""The optimiser-path benchmark's pipeline on the ci preset (tiny volumes: the numbers mean
nothing, the shape of the results does)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import variational
from benchmarks.variational.pipeline import jobs_of

pytest.importorskip("nilearn")  # the cohorts' anatomy


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("variational")
    argv = ["--preset", "ci", "--seed", "0", "--out", str(root / "out"),
            "--work-dir", str(root / "work"), "--jobs", "1", "--no-progress"]  # fmt: skip
    assert variational.main(argv) == 0
    payload = json.loads((root / "out" / "variational_ci.json").read_text())
    return SimpleNamespace(root=root, argv=argv, payload=payload)


def test_every_run_and_path_is_reported(ci_run: SimpleNamespace) -> None:
    preset = variational.PRESETS["ci"]
    records = [r for r in ci_run.payload["rows"] if "timing" not in r]
    expected = {(j.method, j.path, j.split) for j in jobs_of(preset)}
    assert {(r["method"], r["path"], r["split"]) for r in records} == expected
    # IVON's prior is Gaussian: it runs for the N(0, 1) control only
    assert ("dwp", "ivon", 0) not in expected and ("normal_prior", "ivon", 0) in expected
    for r in records:
        assert 0 <= r["dice"] <= 1 and r["steps"] >= 1
        if r["method"] != "pretrained":
            assert r["neg_elbo"] > 0 and r["kl"] > 0 and r["log_sigma_change"] >= 0
    markdown = (ci_run.root / "out" / "variational_ci.md").read_text()
    for heading in ("What each optimiser path learned", "without a learned posterior", "Cost"):
        assert heading in markdown


def test_the_natural_path_moves_the_scales_and_adam_does_not(ci_run: SimpleNamespace) -> None:
    rows = {(r["method"], r["path"]): r for r in ci_run.payload["config"]["summary"]}
    for method in ("normal_prior", "dwp"):
        natural = rows[method, "natural"]["log_sigma_change"]
        assert natural > 0.1 > rows[method, "adam_tenth"]["log_sigma_change"]


def test_step_times_are_ratios_to_plain_adam(ci_run: SimpleNamespace) -> None:
    timing = [r for r in ci_run.payload["rows"] if r.get("timing")]
    assert {r["path"] for r in timing} == set(variational.PRESETS["ci"].paths)
    assert all(r["baseline"] == "adam" and r["ratio"] > 0 for r in timing)
    assert next(r for r in timing if r["path"] == "adam")["ratio"] == 1.0


def test_a_rerun_reads_every_run_back(ci_run: SimpleNamespace, monkeypatch) -> None:
    from benchmarks.variational import runs

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runs, "train", no_training)
    argv = [*ci_run.argv, "--out", str(ci_run.root / "again")]
    assert variational.main(argv) == 0
    again = json.loads((Path(ci_run.root) / "again" / "variational_ci.json").read_text())
    first = [r for r in ci_run.payload["rows"] if "timing" not in r]
    assert [r for r in again["rows"] if "timing" not in r] == first


def test_a_runs_key_holds_no_device_and_mixed_precision_only_when_on() -> None:
    from benchmarks.variational.config import PRESETS
    from benchmarks.variational.pipeline import transfer_preset
    from benchmarks.variational.runs import Run

    preset = PRESETS["quick"]
    transfer = transfer_preset(preset)
    run = Run("dwp", "natural", 0)
    key = run.key(preset, transfer, {})
    assert not {"device", "amp"} & key["transfer"].keys()  # the float32 keys of before
    assert run.key(preset, transfer.replace(device="cpu"), {}) == key
    assert run.key(preset, transfer.replace(amp="bf16"), {})["transfer"]["amp"] == "bf16"


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--device", "gpu"], "error: --device 'gpu' is not a torch device"),
        (["--amp", "fp16"], "error: --amp fp16 needs a CUDA device (device cpu); use --amp bf16"),
        (["--amp", "half"], "error: --amp must be one of off, bf16, fp16, got 'half'"),
    ],
)
def test_a_bad_device_or_precision_is_one_line_before_anything_is_written(
    tmp_path: Path, capsys, option: list[str], message: str
) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--preset", "ci", "--out", str(out), "--work-dir", str(work), *option]
    assert variational.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not out.exists() and not work.exists()


def test_the_runs_get_the_device_and_precision_asked() -> None:
    from benchmarks.variational.pipeline import transfer_preset

    preset = variational.PRESETS["ci"]
    transfer = transfer_preset(preset, "cpu", "bf16")
    assert (transfer.device, transfer.amp) == ("cpu", "bf16")
    assert transfer_preset(preset) == transfer.replace(amp="off")
    with pytest.raises(ValueError, match="amp fp16 needs a CUDA device"):
        transfer_preset(preset, "cpu", "fp16")


def test_ivon_trains_on_the_device_in_mixed_precision(tmp_path: Path, monkeypatch) -> None:
    import torch

    import dwp
    from benchmarks.variational import runs
    from benchmarks.variational.pipeline import transfer_preset
    from unet3d.model import UNet3D

    preset = variational.PRESETS["ci"]
    transfer = transfer_preset(preset, "cpu", "bf16")
    torch.manual_seed(0)
    source = tmp_path / "source.pt"
    torch.save(UNet3D(1, 2, transfer.widths).state_dict(), source)
    volumes = [
        {"image": torch.randn(1, *transfer.crop), "label": (torch.rand(transfer.crop) > 0.9).long()}
        for _ in range(3)
    ]
    datasets = SimpleNamespace(pool=volumes, val=volumes[:2])
    outputs: list[torch.dtype] = []

    class Recorded(UNet3D):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            outputs.append(out.dtype)
            return out

    monkeypatch.setattr(runs, "UNet3D", Recorded)
    model, start, steps = runs._train_ivon(preset, transfer, datasets, [0, 1], str(source), 0)
    # two training steps in bf16 autocast, each followed by a float32 validation
    assert steps == 2 and outputs.count(torch.bfloat16) == 2
    assert outputs.count(torch.float32) == 2  # one batch of the two validation volumes
    assert {p.device.type for p in model.parameters()} == {"cpu"} and start.device.type == "cpu"
    assert dwp.bayesian_layers(model)  # IVON's posterior


def test_an_overflowed_ivon_step_is_dropped_and_the_next_one_taken() -> None:
    import torch

    import dwp
    from benchmarks.variational.runs import scaled_step

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = dwp.optim.IVON(model.parameters(), lr=0.1, ess=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # fp16's scaler, on the CPU
    x = torch.randn(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    with optimizer.sampled_params(train=True):
        scaler.scale(model(x).square().sum() * 1e30).backward()  # overflows: inf gradients
    scaled_step(optimizer, scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert scaler.get_scale() < 2.0**100  # lowered, as after a skipped step
    with optimizer.sampled_params(train=True):  # the dropped step's sample is gone
        scaler.scale(model(x).square().sum()).backward()
    scaled_step(optimizer, scaler)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
