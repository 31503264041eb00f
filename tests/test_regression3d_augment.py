"""RigidAugmentation: seeded, shape- and zero-preserving, and the flips it draws are flips."""

from __future__ import annotations

import pytest
import torch

import regression3d as r3d


def test_same_seed_same_batches_and_zero_images_stay_zero() -> None:
    x = torch.rand(3, 1, 10, 12, 8)
    a, b = r3d.RigidAugmentation(seed=3), r3d.RigidAugmentation(seed=3)
    first = a(x)
    assert first.shape == x.shape and first.dtype == x.dtype
    assert type(first) is torch.Tensor  # not a MONAI MetaTensor
    torch.testing.assert_close(first, b(x))
    assert not torch.equal(a(x), first)  # the next batch gets new draws
    assert r3d.RigidAugmentation(seed=0)(torch.zeros(2, 1, 6, 6, 6)).abs().max() == 0


def test_without_rotation_and_translation_each_image_is_one_of_its_flips() -> None:
    x = torch.rand(16, 1, 5, 6, 7)
    out = r3d.RigidAugmentation(rotation=0.0, translation=0.0, seed=0)(x)
    candidates = lambda v: [v, v.flip(1), v.flip(2), v.flip(1).flip(2)]  # noqa: E731
    seen = set()
    for image, moved in zip(x, out, strict=True):
        hits = [i for i, c in enumerate(candidates(image)) if torch.allclose(c, moved, atol=1e-5)]
        assert hits, "an image was changed by something other than a flip"
        seen.add(hits[0])
    assert len(seen) >= 3  # 16 images, each of 4 outcomes with probability 1/4


def test_rotation_moves_intensity_but_keeps_its_scale() -> None:
    x = torch.zeros(4, 1, 16, 16, 16)
    x[:, :, 4:12, 6:10, 5:11] = 1.0
    out = r3d.RigidAugmentation(seed=1)(x)
    assert not torch.allclose(out, x)
    # a rigid motion inside the field of view keeps the mass up to interpolation
    torch.testing.assert_close(out.sum((1, 2, 3, 4)), x.sum((1, 2, 3, 4)), rtol=0.1, atol=0)


def test_bad_settings_and_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="rotation"):
        r3d.RigidAugmentation(rotation=-0.1)
    with pytest.raises(ValueError, match="flip_axes"):
        r3d.RigidAugmentation(flip_axes=(3,))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        r3d.RigidAugmentation()(torch.zeros(1, 4, 4, 4))
