"""BagNet3D: receptive fields, local maps, strict locality, NIfTI output, Bayesian twin."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import dwp
from regression3d import (
    KERNEL3,
    BagNet3D,
    bagnet3d,
    linearised,
    local_map_affine,
    measure_receptive_field,
    save_local_map,
)


class _Features(nn.Module):
    """The feature extractor of a BagNet as a module (what the field is measured on)."""

    def __init__(self, net: BagNet3D) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


@pytest.mark.parametrize("field", [9, 17, 33])
def test_receptive_field_measured_on_a_linearised_copy(field: int) -> None:
    torch.manual_seed(0)
    net = bagnet3d(field, width=1)
    assert net.receptive_field == field  # the closed form of the architecture
    # 48^3 leaves the centre location's field clear of the border for 9-33
    measured = measure_receptive_field(_Features(linearised(net)), (1, 48, 48, 48))
    assert measured == (field, field, field)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_receptive_field_177_along_each_axis(axis: int) -> None:
    torch.manual_seed(0)
    net = bagnet3d(177, width=1)
    assert net.receptive_field == 177
    # long along one axis only (a 200^3 volume would be needlessly slow)
    shape = [24, 24, 24]
    shape[axis] = 208
    measured = measure_receptive_field(_Features(linearised(net)), (1, *shape))
    assert measured[axis] == 177
    assert net.kernel3 == KERNEL3[177] == (3, 4, 6, 3)


def test_linearised_copy_has_no_activation_or_norm_and_leaves_the_model_alone() -> None:
    net = bagnet3d(9, width=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    lin = linearised(net)
    kinds = {type(m) for m in lin.modules()}
    assert not kinds & {nn.ReLU, nn.InstanceNorm3d}
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key])


def test_global_prediction_is_the_mean_of_the_local_map() -> None:
    torch.manual_seed(0)
    net = bagnet3d(17, width=2, out_features=3).eval()
    x = torch.randn(2, 1, 24, 32, 16)
    local = net.local_map(x)
    assert local.shape == (2, 3, 3, 4, 2)  # ceil(size / 8)
    torch.testing.assert_close(net(x), local.mean(dim=(2, 3, 4)), rtol=1e-5, atol=1e-6)
    # not trivially so: locations differ
    assert local.flatten(2).std(-1).min() > 0


def _outside_field_perturbed(net: BagNet3D, x: torch.Tensor, location: tuple[int, int, int]):
    """Output at ``location`` before and after changing every voxel outside its field, and
    after changing one voxel inside it."""
    lin = linearised(net).double()
    xg = x.clone().requires_grad_(True)
    lin.local_map(xg)[(0, 0, *location)].backward()
    inside = xg.grad[0, 0] != 0
    assert 0 < int(inside.sum()) < inside.numel()
    noise = torch.randn_like(x)
    outside = x.clone()
    outside[0, 0][~inside] += 5 * noise[0, 0][~inside]
    within = x.clone()
    centre = torch.nonzero(inside).float().mean(0).round().long().tolist()
    within[(0, 0, *centre)] += 5.0
    with torch.no_grad():
        return [net.local_map(v)[(0, 0, *location)] for v in (x, outside, within)]


def test_strictly_local_variant_ignores_voxels_outside_the_field() -> None:
    torch.manual_seed(0)
    net = bagnet3d(9, width=2, norm="channel").double().eval()
    x = torch.randn(1, 1, 40, 40, 40, dtype=torch.float64)
    base, outside, within = _outside_field_perturbed(net, x, (2, 2, 2))
    torch.testing.assert_close(outside, base, rtol=0, atol=1e-12)
    assert abs(float(within - base)) > 1e-6  # the field itself does matter


def test_instance_norm_variant_is_not_strictly_local() -> None:
    # the twin of the test above: whole-volume statistics leak in, which that test would catch
    torch.manual_seed(0)
    net = bagnet3d(9, width=2, norm="instance").double().eval()
    x = torch.randn(1, 1, 40, 40, 40, dtype=torch.float64)
    base, outside, _ = _outside_field_perturbed(net, x, (2, 2, 2))
    assert abs(float(outside - base)) > 1e-6


def test_local_map_nifti_keeps_the_input_affine(tmp_path) -> None:
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) * 4.0
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = rotation, [-90.0, 12.5, -70.0]
    shape = (40, 48, 32)
    local = np.random.default_rng(0).normal(size=(5, 6, 4)).astype(np.float32)

    path = save_local_map(local, tmp_path / "local.nii.gz", stride=8, input_affine=affine)
    img = nib.load(path)
    np.testing.assert_allclose(img.affine, affine @ np.diag([8, 8, 8, 1]), atol=1e-5)
    np.testing.assert_allclose(local_map_affine(affine, 8), affine @ np.diag([8, 8, 8, 1]))
    # local voxel (i, j, k) lies on input voxel 8 * (i, j, k) in world coordinates
    ijk = np.array([2, 3, 1, 1.0])
    np.testing.assert_allclose(img.affine @ ijk, affine @ np.r_[8 * ijk[:3], 1], atol=1e-4)
    np.testing.assert_array_equal(np.asarray(img.dataobj), local)

    up = nib.load(
        save_local_map(
            local, tmp_path / "up.nii.gz", stride=8, input_affine=affine,
            input_shape=shape, grid="input",
        )
    )  # fmt: skip
    assert up.shape == shape
    np.testing.assert_allclose(up.affine, affine, atol=1e-5)
    data = np.asarray(up.dataobj)
    # exact at the sample points, linear halfway between two of them
    np.testing.assert_allclose(data[16, 24, 8], local[2, 3, 1], atol=1e-5)
    np.testing.assert_allclose(data[20, 24, 8], 0.5 * (local[2, 3, 1] + local[3, 3, 1]), atol=1e-5)


def test_bad_inputs_name_the_argument(tmp_path) -> None:
    with pytest.raises(ValueError, match="receptive_field"):
        bagnet3d(65)
    with pytest.raises(ValueError, match="kernel3"):
        BagNet3D(kernel3=(4, 0, 0, 0))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        bagnet3d(9, width=1)(torch.zeros(1, 8, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        save_local_map(
            np.full((2, 2, 2), np.nan), tmp_path / "x.nii", stride=8, input_affine=np.eye(4)
        )
    with pytest.raises(ValueError, match="input_shape"):
        save_local_map(
            np.zeros((2, 2, 2)), tmp_path / "x.nii", stride=8, input_affine=np.eye(4), grid="input"
        )


def test_bayesianize_turns_every_conv_and_the_head_bayesian() -> None:
    torch.manual_seed(0)
    net = bagnet3d(33, width=1).eval()
    bnn = dwp.bayesianize(net, dwp.NormalPrior()).eval()
    n_layers = sum(isinstance(m, (nn.Conv3d, nn.Linear)) for m in net.modules())
    assert len(dwp.bayesian_layers(bnn)) == n_layers
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(bnn(x), net(x))  # mean mode = the deterministic net
        torch.testing.assert_close(bnn.local_map(x).mean((2, 3, 4)), bnn(x), rtol=1e-5, atol=1e-6)
