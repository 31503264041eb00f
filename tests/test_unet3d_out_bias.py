"""``UNet3D(out_bias=True)``: the output conv's bias, the exit from the all-background trap.

The reference network has no bias anywhere, so a feature map that is all zero after the
last ReLU gives every class the same logit (p = 1/2 for two classes) whatever the
weights; with the bias those voxels get the bias's class.  A bias-free source loads into
the biased model with the bias at zero (the same function), through every strategy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from decathlon import write_decathlon

import dwp
from unet3d import UNet3D, cli
from unet3d.checkpoint import CheckpointError, load_model, load_source
from unet3d.strategies import STRATEGIES, ModelSpec, get_strategy

WIDTHS = (2, 4, 4, 8)
X = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))


def _silence_last_relu(model: torch.nn.Module) -> None:
    """Make the output conv see an all-zero feature map (every channel off everywhere)."""
    model.out.act.register_forward_hook(lambda module, inputs, output: torch.zeros_like(output))


def test_the_bias_adds_n_classes_parameters_initialised_at_zero() -> None:
    torch.manual_seed(0)
    model = UNet3D(out_bias=True)
    assert sum(p.numel() for p in model.parameters()) == 726_480 + 2
    assert torch.equal(model.out.conv.bias, torch.zeros(2))
    assert [n for n, _ in model.named_parameters() if not n.endswith("weight")] == ["out.conv.bias"]
    model.out.conv.bias.data.fill_(3.0)
    model.reset_parameters()  # back to neutral between the classes
    assert torch.equal(model.out.conv.bias, torch.zeros(2))
    assert UNet3D(n_classes=4, widths=WIDTHS, out_bias=True).out.conv.bias.shape == (4,)


def test_a_silent_feature_map_gives_the_bias_or_one_half() -> None:
    # the closed form of the trap: logits = W relu(h) + b = b when relu(h) = 0
    torch.manual_seed(0)
    plain, biased = UNet3D(widths=WIDTHS), UNet3D(widths=WIDTHS, out_bias=True)
    with torch.no_grad():
        biased.out.conv.bias.copy_(torch.tensor([-0.5, 0.25]))
    for model in (plain, biased):
        _silence_last_relu(model)
    with torch.no_grad():
        p_plain = plain(X).softmax(1)
        logits = biased(X)
    assert torch.equal(p_plain, torch.full_like(p_plain, 0.5))
    expected = torch.tensor([-0.5, 0.25]).view(1, 2, 1, 1, 1).expand_as(logits)
    assert torch.equal(logits, expected)
    assert bool((logits.argmax(1) == 1).all())  # silence now means foreground


def _source(tmp_path: Path) -> tuple[Path, UNet3D]:
    torch.manual_seed(1)
    source = UNet3D(widths=WIDTHS)
    path = tmp_path / "source.pt"
    torch.save(source.state_dict(), path)
    return path, source


def test_a_bias_free_source_loads_with_the_bias_at_zero_and_the_same_function(tmp_path) -> None:
    path, source = _source(tmp_path)
    model = UNet3D(widths=WIDTHS, out_bias=True)
    with torch.no_grad():
        model.out.conv.bias.fill_(1.0)  # whatever it held, the source's function is restored
    load_source(model, path)
    assert torch.equal(model.out.conv.bias, torch.zeros(2))
    with torch.no_grad():
        torch.testing.assert_close(model(X), source(X), rtol=0, atol=0)


def test_a_biased_source_does_not_load_into_a_bias_free_model(tmp_path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "biased.pt"
    torch.save(UNet3D(widths=WIDTHS, out_bias=True).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"biased\.pt: .*unexpected \['out\.conv\.bias'\]"):
        load_source(UNet3D(widths=WIDTHS), path)
    # and another architecture is still named, out_bias included
    with pytest.raises(CheckpointError, match=r"widths=\(4, 4, 4, 8\), out_bias=True"):
        load_source(UNet3D(widths=(4, 4, 4, 8), out_bias=True), path)


def _options(name: str, source: Path, prior: Path) -> dict:
    return {
        "random_init": {},
        "pretrained": {"source": source},
        "pretrained_frozen": {"source": source, "freeze_depth": 1},
        "l2_sp": {"source": source, "alpha": 0.1},
        "normal_prior": {"source": source, "init": "pretrained"},
        "dwp": {"prior_path": prior, "source": source, "init": "pretrained"},
        "prior": {"prior_path": prior, "source": source, "init": "pretrained"},
    }[name]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_builds_the_bias_deterministic_trainable_and_at_zero(tmp_path, name):
    path, source = _source(tmp_path)
    prior = tmp_path / "prior.pt"
    dwp.DeepWeightPrior({"g": dwp.KernelVAE((3, 3, 3), hidden=4)}).save(prior)
    strategy = get_strategy(name, **_options(name, path, prior))
    torch.manual_seed(0)
    model = strategy.build_model(ModelSpec(widths=WIDTHS, out_bias=True))
    bias = model.get_parameter("out.conv.bias")
    assert torch.equal(bias.detach(), torch.zeros(2)) and bias.requires_grad  # PRf trains `out`
    # a plain parameter: no posterior scale, no prior over it
    assert not any("out.conv.bias_" in n for n, _ in model.named_parameters())
    if name != "random_init":  # the start computes the source's function
        model.eval()
        if strategy.bayesian:
            dwp.set_mode(model, "mean")
        with torch.no_grad():
            torch.testing.assert_close(model(X), source(X))


def test_an_out_bias_run_trains_the_bias_and_rebuilds_for_prediction(tmp_path) -> None:
    data = write_decathlon(tmp_path / "data", 3, seed=0)
    out = tmp_path / "run"
    argv = [
        "train", "--data", str(data), "--val-fraction", "0.34", "--widths", "2", "4", "4",
        "8", "--size", "16", "--epochs", "2", "--lr", "1e-2", "--batch-size", "1",
        "--out", str(out), "--no-progress", "--out-bias", "--strategy", "normal_prior",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    trained = load_model(out / "best.pt")
    assert trained.config["out_bias"] is True and trained.model.out_bias
    bias = trained.model.out.conv.bias
    assert bias is not None and bool((bias != 0).any())  # the bias learned something
    # a run without the flag has no bias, and old configs without the key load bias-free
    assert UNet3D(widths=WIDTHS).out.conv.bias is None
