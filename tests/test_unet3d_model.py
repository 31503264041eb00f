"""The reference 3D U-Net (Kuzina et al. 2019, appendix B): counts, shapes, structure, init."""

import math
import re

import pytest
import torch
from torch import nn

import dwp
from unet3d import UNet3D, count_kernels, kernel3_layers

SMALL = (4, 8, 8, 16)  # same topology, ~1/16 of the default's parameters: fast on CPU


@pytest.fixture(scope="module")
def default_model() -> UNet3D:
    torch.manual_seed(0)
    return UNet3D()


def test_default_parameter_and_kernel_counts(default_model):
    assert sum(p.numel() for p in default_model.parameters()) == 726_480
    assert count_kernels(default_model) == 26_640
    assert count_kernels(default_model, 3) == 26_640  # an int kernel size works too
    assert (
        sum(default_model.get_submodule(n).weight.numel() for n in kernel3_layers(default_model))
        == 26_640 * 27
    )
    # no biases and no norm parameters anywhere: every parameter is a conv weight
    assert all(name.endswith("weight") for name, _ in default_model.named_parameters())
    assert all(not m.affine for m in default_model.modules() if isinstance(m, nn.InstanceNorm3d))


def test_default_one_by_one_convs(default_model):
    one = {
        name: tuple(m.weight.shape[:2]) + tuple(m.stride)
        for name, m in default_model.named_modules()
        if isinstance(m, nn.Conv3d) and m.kernel_size == (1, 1, 1)
    }
    assert one == {
        "down1.shortcut.conv": (32, 16, 2, 2, 2),
        "down3.shortcut.conv": (32, 32, 2, 2, 2),
        "down5.shortcut.conv": (64, 32, 2, 2, 2),
        "up1.reduce.conv": (32, 64, 1, 1, 1),
        "up2.reduce.conv": (32, 32, 1, 1, 1),
        "up3.reduce.conv": (16, 32, 1, 1, 1),
        "out.conv": (2, 16, 1, 1, 1),
    }
    assert count_kernels(default_model, (1, 1, 1)) == 7_200
    # every conv is either 3x3x3 or 1x1x1
    n_convs = sum(isinstance(m, nn.Conv3d) for m in default_model.modules())
    assert n_convs == len(kernel3_layers(default_model)) + len(one) == 19 + 7


def test_kernel3_layer_names(default_model):
    names = kernel3_layers(default_model)
    blocks = [f"down{i}" for i in range(1, 7)] + [f"up{i}" for i in range(1, 4)]
    assert names == ["init_conv"] + [f"{b}.conv_{k}.conv" for b in blocks for k in (1, 2)]
    strided = [n for n in names if default_model.get_submodule(n).stride == (2, 2, 2)]
    assert strided == ["down1.conv_1.conv", "down3.conv_1.conv", "down5.conv_1.conv"]


def test_wider_variant_kernel_count():
    wide = UNet3D(widths=(64, 128, 128, 256), init="torch")
    # every 3x3x3 conv grows 16x except init_conv, whose input stays 1 channel (4x)
    assert count_kernels(wide) == 16 * (26_640 - 16) + 4 * 16 == 426_048
    assert count_kernels(UNet3D(in_channels=4, widths=(64, 128, 128, 256))) == 16 * 26_640


@pytest.mark.parametrize(
    ("shape", "in_channels", "n_classes", "widths"),
    [
        ((1, 1, 16, 16, 16), 1, 2, (16, 32, 32, 64)),
        ((2, 1, 24, 16, 32), 1, 2, SMALL),
        ((1, 3, 16, 24, 8), 3, 5, SMALL),
        ((2, 2, 16, 16, 16), 2, 1, (2, 3, 5, 7)),
    ],
)
def test_output_shape(shape, in_channels, n_classes, widths):
    torch.manual_seed(0)
    model = UNet3D(in_channels, n_classes, widths)
    out = model(torch.randn(shape))
    assert out.shape == (shape[0], n_classes, *shape[2:])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 1, 16, 16, 12), "divisible by 8"),
        ((1, 1, 20, 16, 16), "divisible by 8"),
        ((1, 2, 16, 16, 16), "1 input channel"),
        ((1, 16, 16, 16), "5-D input"),
        ((1, 1, 8, 8, 8), "more than one voxel"),
    ],
)
def test_bad_input_raises_naming_the_shape(shape, message):
    model = UNet3D(widths=SMALL)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        model(torch.zeros(shape))
    assert str(tuple(shape)) in str(err.value)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="widths"):
        UNet3D(widths=(16, 32, 64))
    with pytest.raises(ValueError, match="init"):
        UNet3D(init="xavier")


def test_bayesianize_only_3x3x3_and_mean_mode_matches():
    torch.manual_seed(0)
    model = UNet3D(widths=SMALL).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    bnn = dwp.bayesianize(model, include=kernel3_layers(model)).eval()
    bayes = [name for name, _ in dwp.bayesian_layers(bnn)]
    assert bayes == kernel3_layers(model)
    assert all(isinstance(bnn.get_submodule(n), dwp.BayesConv3d) for n in bayes)
    # the 1x1x1 convs stay plain torch convs
    plain = [
        n for n, m in bnn.named_modules() if type(m) is nn.Conv3d and m.kernel_size == (1, 1, 1)
    ]
    assert len(plain) == 7
    # helpers see through the Bayesian twins
    assert kernel3_layers(bnn) == kernel3_layers(model)
    assert count_kernels(bnn) == count_kernels(model)
    with torch.no_grad():
        torch.testing.assert_close(bnn(x), model(x), rtol=1e-5, atol=1e-5)
        # sampling mode does perturb the output: the layers really are Bayesian
        with dwp.sampling():
            assert not torch.allclose(bnn(x), model(x), atol=1e-6)


def test_train_and_eval_modes_agree():
    # InstanceNorm without running statistics: no mode-dependent state (MC prediction
    # in eval mode sees the same deterministic network as training)
    torch.manual_seed(0)
    model = UNet3D(widths=SMALL)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.train()(x), model.eval()(x))


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = UNet3D(widths=SMALL)
    x = torch.randn(2, 1, 16, 16, 16)
    y = torch.randint(0, 2, (2, 16, 16, 16))
    nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.init_conv.weight.grad.abs().sum() > 0


def test_residual_and_skip_structure():
    torch.manual_seed(0)
    model = UNet3D(widths=SMALL).eval()
    with torch.no_grad():
        for block in (model.down1, model.down2, model.up3):
            block.conv_2.conv.weight.zero_()  # the residual branch then adds nothing
        x = torch.randn(1, 4, 16, 16, 16)
        # identity shortcut
        z = torch.randn(1, 8, 8, 8, 8)
        torch.testing.assert_close(model.down2(z), z)
        # projection shortcut: pre-activated 1x1x1 stride-2 conv
        torch.testing.assert_close(model.down1(x), model.down1.shortcut(x))
        assert model.down1(x).shape == (1, 8, 8, 8, 8)
        # up block: reduce, trilinear x2 upsampling, additive skip
        coarse, skip = torch.randn(1, 8, 8, 8, 8), torch.randn(1, 4, 16, 16, 16)
        expected = (
            nn.functional.interpolate(
                model.up3.reduce(coarse), scale_factor=2, mode="trilinear", align_corners=False
            )
            + skip
        )
        torch.testing.assert_close(model.up3(coarse, skip), expected)


def test_he_init_matches_kaiming_fan_in(default_model):
    # down5.conv_1: 32 -> 64, fan_in = 32*27 = 864, fan_out = 1728: the two modes differ
    for name in ("down5.conv_1.conv", "down6.conv_2.conv", "up1.reduce.conv"):
        w = default_model.get_submodule(name).weight
        fan_in = w.shape[1] * w[0, 0].numel()
        expected = math.sqrt(2.0 / fan_in)
        n = w.numel()
        # sample std of n normal draws: relative standard error 1 / sqrt(2n); allow 5 of them
        assert abs(w.std().item() / expected - 1) < 5 / math.sqrt(2 * n), name
        assert abs(w.mean().item()) < 5 * expected / math.sqrt(n), name


def test_reset_parameters_redraws_weights():
    torch.manual_seed(0)
    model = UNet3D(widths=SMALL)
    before = model.down2.conv_1.conv.weight.clone()
    model.reset_parameters()
    assert not torch.equal(before, model.down2.conv_1.conv.weight)
    torch_init = UNet3D(widths=SMALL, init="torch")
    w = torch_init.down6.conv_2.conv.weight  # kaiming_uniform(a=sqrt(5)): bound 1/sqrt(fan_in)
    assert w.abs().max() <= 1 / math.sqrt(16 * 27)
