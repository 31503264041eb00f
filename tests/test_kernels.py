"""dwp.kernels: collecting kernel slices from modules, state dicts and checkpoints, layer
selection, the four groupings (resolution on a small 3D U-Net) and Bayesian sources.
The bank itself (pruning, validation, its file) is tested in test_kernel_bank.py.
"""

import copy

import pytest
import torch
from kernel_nets import UNET_GROUPS, Net2d, TinyUNet3d
from kernel_nets import assert_same_bank as _assert_same_bank
from kernel_nets import net2d as _net2d
from kernel_nets import unet as _unet
from torch import nn

import dwp
from dwp.kernels import collect_kernels


# -- slices and provenance ----------------------------------------------------------------
def test_slices_are_the_reshaped_weights_with_provenance():
    net = _net2d()
    bank = collect_kernels(net)
    assert bank.layer_names == ["conv1", "conv2"]  # 1x1 and transposed left out
    assert bank.kernel_shape == (5, 5) and len(bank) == 4 * 3 + 6 * 2
    assert bank.kernels.dtype == torch.float32 and not bank.kernels.requires_grad
    conv1 = bank.kernels[bank.layer == 0]
    assert conv1.shape == (12, 5, 5)
    # slice o * C_in + i is w[o, i]
    assert torch.equal(conv1[2 * 3 + 1], net.conv1.weight[2, 1])
    assert torch.equal(bank.kernels[bank.layer == 1], net.conv2.weight.detach().reshape(12, 5, 5))
    assert bank.metadata["total"] == {"conv1": 12, "conv2": 12}
    # the bank is a copy: changing the network leaves it alone
    with torch.no_grad():
        net.conv1.weight.zero_()
    assert conv1.abs().sum() > 0


def test_provenance_maps_back_to_source_and_layer():
    nets = [_net2d(0), _net2d(1)]
    del nets[1].conv1  # a source may lack a layer
    bank = collect_kernels(nets, source_names=["a", "b"])
    assert bank.source_names == ["a", "b"]
    assert len(bank) == 12 + 12 + 12
    for s, net in enumerate(nets):
        for layer, name in enumerate(bank.layer_names):
            mask = (bank.source == s) & (bank.layer == layer)
            conv = getattr(net, name, None)
            if conv is None:
                assert not mask.any()
            else:
                assert torch.equal(bank.kernels[mask], conv.weight.detach().reshape(-1, 5, 5))


def test_modules_state_dicts_and_checkpoints_give_the_same_bank(tmp_path):
    nets = [_net2d(0), _net2d(1)]
    states = [n.state_dict() for n in nets]
    torch.save(states[0], tmp_path / "plain.pt")
    torch.save({"state_dict": states[1], "epoch": 3}, tmp_path / "wrapped.pt")
    torch.save({"model": states[1], "optimizer": {}}, tmp_path / "model.pt")
    # the transposed conv is told apart in state dicts by the template
    reference = collect_kernels(nets)
    for sources in (states, [tmp_path / "plain.pt", str(tmp_path / "wrapped.pt")]):
        _assert_same_bank(reference, collect_kernels(sources, template=Net2d()), False)
    _assert_same_bank(reference, collect_kernels([nets[0], tmp_path / "model.pt"]), False)
    files = collect_kernels([tmp_path / "plain.pt", tmp_path / "model.pt"], template=Net2d())
    assert files.source_names == ["plain.pt", "model.pt"]
    # without a template a state dict's transposed conv cannot be told from a conv
    assert "up" in collect_kernels(states, kernel_shape=(5, 5)).layer_names


def test_default_source_names_stay_unique(tmp_path):
    for run in ("run1", "run2"):
        (tmp_path / run).mkdir()
        torch.save(_net2d().state_dict(), tmp_path / run / "model.pt")
    paths = [tmp_path / "run1" / "model.pt", tmp_path / "run2" / "model.pt"]
    bank = collect_kernels(paths, template=Net2d())
    assert bank.source_names == [str(p) for p in paths]
    assert collect_kernels([_net2d(), _net2d()]).source_names == ["source0", "source1"]


def test_tied_weights_count_once():
    net = _net2d()
    net.conv3 = net.conv2  # one module, two names
    assert collect_kernels(net).layer_names == ["conv1", "conv2"]
    assert collect_kernels(net.state_dict()).layer_names == ["conv1", "conv2", "up"]


# -- kernel shapes and layer choice -------------------------------------------------------
@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv1d(2, 3, 7), (7,)),
        (nn.Conv2d(2, 3, 5), (5, 5)),
        (nn.Conv3d(2, 3, 3), (3, 3, 3)),
        (nn.Conv3d(2, 3, (3, 1, 5)), (3, 1, 5)),  # non-cubic, one spatial size 1
    ],
)
def test_kernel_shapes(conv, shape):
    torch.manual_seed(0)
    net = nn.Sequential(conv, nn.ReLU(), type(conv)(3, 4, 1))  # the 1x1 is skipped
    bank = collect_kernels(net)
    assert bank.kernel_shape == shape and bank.layer_names == ["0"] and len(bank) == 6
    assert torch.equal(bank.kernels, conv.weight.detach().reshape(6, *shape))
    _assert_same_bank(bank, collect_kernels(net.state_dict()))


def test_pointwise_convs_only_when_asked_for():
    net = _net2d()
    assert collect_kernels(net, kernel_shape=(1, 1)).layer_names == ["mix"]
    assert collect_kernels(net, include=["mix"]).layer_names == ["mix"]
    with pytest.raises(ValueError, match="no conv layer with a spatial kernel"):
        collect_kernels(nn.Sequential(nn.Conv2d(2, 2, 1)))


def test_kernel_shape_filter_and_mixed_shapes():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 5), nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 7)
    )
    with pytest.raises(ValueError, match=r"'1': \(5, 5\).*'3': \(7, 7\)"):
        collect_kernels(net)
    assert collect_kernels(net, kernel_shape=(3, 3)).layer_names == ["0", "2"]
    assert collect_kernels(net, kernel_shape=[5, 5]).layer_names == ["1"]
    assert collect_kernels(net, include=["0", "2"]).layer_names == ["0", "2"]
    assert collect_kernels(net, include=lambda n: n in "13", kernel_shape=(7, 7)).layer_names == [
        "3"
    ]
    with pytest.raises(ValueError, match=r"kernel shape \(9, 9\)"):
        collect_kernels(net, kernel_shape=(9, 9))


def test_include_patterns():
    net = _unet()
    bank = collect_kernels(net, include="enc*")
    assert bank.layer_names == ["enc0", "enc1"]
    with pytest.raises(ValueError, match=r"\['decoder\.\*'\] match no conv layer"):
        collect_kernels(net, include=["enc*", "decoder.*"])


def test_a_layer_with_another_shape_in_another_source_raises():
    other = TinyUNet3d()
    other.enc1 = nn.Conv3d(2, 2, 5, padding=2)
    with pytest.raises(ValueError, match=r"layer 'enc1' has different kernel shapes"):
        collect_kernels([_unet(), other])
    with pytest.raises(ValueError, match=r"layer 'enc1' has different kernel shapes"):
        collect_kernels([_unet(), other], kernel_shape=(3, 3, 3))


def test_bad_arguments():
    net = _net2d()
    with pytest.raises(ValueError, match="at least one source"):
        collect_kernels([])
    with pytest.raises(ValueError, match="group_by must be"):
        collect_kernels(net, group_by="depth")
    with pytest.raises(ValueError, match="1 source_names for 2 sources"):
        collect_kernels([net, net], source_names=["a"])
    with pytest.raises(ValueError, match="unique"):
        collect_kernels([net, _net2d(1)], source_names=["a", "a"])
    with pytest.raises(TypeError, match="a source must be"):
        collect_kernels([net, 3])


def test_unreadable_checkpoints_raise_naming_the_file(tmp_path):
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: holds neither a state dict"):
        collect_kernels(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt: cannot read the checkpoint"):
        collect_kernels(tmp_path / "junk.pt")


# -- grouping -----------------------------------------------------------------------------
def test_group_by_layer_all_and_callable():
    net = _unet()
    by_layer = collect_kernels(net)
    assert by_layer.group_names == by_layer.layer_names
    assert by_layer.layer_names == ["dec1", "dec0", "enc0", "down1", "enc1", "down2", "bottom"]
    assert torch.equal(by_layer.group, by_layer.layer)

    everything = collect_kernels(net, "all")
    assert everything.group_names == ["all"]
    assert everything.groups()["all"].shape == (26, 3, 3, 3)
    assert torch.equal(everything.select("all"), by_layer.kernels)
    assert everything.metadata["group_by"] == "all"

    def half(name):
        return "decoder" if name.startswith("dec") else "encoder"

    split = collect_kernels(net, half)
    assert split.group_names == ["decoder", "encoder"]
    assert split.layer_groups["bottom"] == "encoder"
    assert torch.equal(split.select("decoder"), by_layer.kernels[by_layer.layer < 2])
    assert split.metadata["group_by"].startswith("callable:")
    with pytest.raises(TypeError, match="layer 'dec1'"):
        collect_kernels(net, lambda name: 0)


def test_group_by_resolution_follows_execution_order():
    net = _unet().train()
    net.norm.eval()  # a mixed train/eval state must come back as it was
    state = copy.deepcopy(net.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    bank = collect_kernels(net, "resolution", example_input=x)
    assert bank.layer_groups == UNET_GROUPS
    assert bank.group_names == ["g0_16x16x16", "g1_8x8x8", "g2_4x4x4", "g3_8x8x8", "g4_16x16x16"]
    assert bank.metadata["resolutions"]["g3_8x8x8"] == [8, 8, 8]
    g0 = torch.cat([net.enc0.weight.reshape(2, 3, 3, 3), net.down1.weight.reshape(4, 3, 3, 3)])
    assert torch.equal(bank.select("g0_16x16x16"), g0.detach())
    # the source is unchanged: train/eval flags and BatchNorm statistics
    assert net.training and not net.norm.training and net.enc0.training
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key

    # state dicts and checkpoints run the template; several sources share the groups
    other = _unet(1).state_dict()
    both = collect_kernels(
        [net.state_dict(), other], "resolution", example_input=x, template=TinyUNet3d()
    )
    assert both.layer_groups == UNET_GROUPS and len(both) == 2 * len(bank)
    _assert_same_bank(
        bank,
        collect_kernels(net.state_dict(), "resolution", example_input=(x,), template=TinyUNet3d()),
    )


def test_group_by_resolution_errors():
    net, x = _unet(), torch.randn(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="needs example_input"):
        collect_kernels(net, "resolution")
    with pytest.raises(ValueError, match="pass template="):
        collect_kernels(net.state_dict(), "resolution", example_input=x)
    with pytest.raises(ValueError, match=r"\['enc0'\] are not conv layers of the Net2d"):
        collect_kernels([net], "resolution", example_input=x, template=Net2d(), include="enc0")
    net.unused = nn.Conv3d(2, 2, 3)
    with pytest.raises(ValueError, match=r"\['unused'\] did not run"):
        collect_kernels(net, "resolution", example_input=x)
    assert net.training  # restored after the failure


def test_a_shared_conv_takes_the_group_of_its_first_call():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.down = nn.Conv2d(1, 1, 3, stride=2, padding=1)
            self.last = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            x = self.down(self.conv(x))
            return self.last(self.conv(x))  # conv again at 4x4

    bank = collect_kernels(Shared(), "resolution", example_input=torch.randn(1, 1, 8, 8))
    assert bank.layer_groups == {"conv": "g0_8x8", "down": "g0_8x8", "last": "g1_4x4"}


# -- Bayesian sources ---------------------------------------------------------------------
def test_a_bayesian_network_gives_its_posterior_means():
    torch.manual_seed(0)
    bnn = dwp.bayesianize(_unet(), prior=dwp.PretrainedNormalPrior())
    assert isinstance(bnn.enc0, dwp.BayesConv3d)
    with torch.no_grad():
        bnn.enc0.weight_log_sigma.fill_(0.0)  # sampling would now change weights a lot
    x = torch.randn(1, 1, 16, 16, 16)
    with dwp.sampling():  # the forward pass uses the means all the same
        rng = torch.get_rng_state()
        bank = collect_kernels(bnn.train(), "resolution", example_input=x)
        assert torch.equal(torch.get_rng_state(), rng)
    plain = collect_kernels(dwp.to_deterministic(bnn), "resolution", example_input=x)
    _assert_same_bank(bank, plain)
    assert bank.layer_groups == UNET_GROUPS and bnn.training
    # the state dict holds log sigmas and prior centres too; only the means are kernels
    _assert_same_bank(
        bank,
        collect_kernels(bnn.state_dict(), "resolution", example_input=x, template=TinyUNet3d()),
    )
