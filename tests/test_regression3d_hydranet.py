"""Hydranet's base regressor and set-sum augmentation, against one-graph twins."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dwp
from regression3d import (
    BaseRegressor,
    draw_sets,
    set_loss_backward,
    set_members,
    set_sum,
    set_targets,
)


def test_base_regressor_has_the_papers_parameter_count() -> None:
    # Dubost et al. 2019: 196,418 parameters (figure 2); closed form in regressor.py
    net = BaseRegressor(1, 1, (32, 64))
    assert sum(p.numel() for p in net.parameters()) == 196_418
    assert net.num_features == 1 + 32 + 64
    assert net(torch.zeros(2, 1, 9, 7, 8)).shape == (2, 1)
    with pytest.raises(ValueError, match="widths"):
        BaseRegressor(widths=())


def test_sets_use_every_item_once_and_targets_sum_the_kept_labels() -> None:
    g = torch.Generator().manual_seed(0)
    sets = draw_sets(10, 4, 0.0, generator=g)
    assert sets.index.shape == (3, 4)
    assert sorted(sets.index[sets.keep].tolist()) == list(range(10))
    assert int(sets.keep.sum()) == 10  # the last set is completed with 2 zero images
    y = torch.arange(10.0).view(10, 1) + 1
    sums = set_targets(y, sets)
    assert sums.shape == (3, 1)
    assert float(sums.sum()) == float(y.sum())
    x = torch.arange(10.0).view(10, 1, 1, 1, 1) + 1
    members = set_members(x, sets)
    assert len(members) == 4 and members[0].shape == (3, 1, 1, 1, 1)
    # a member's image is its item's, or zeros where dropped
    total = torch.stack(members).sum(0).flatten()
    torch.testing.assert_close(total, sums.flatten())


def test_zero_image_rate_follows_p() -> None:
    sets = draw_sets(4000, 4, 0.25, generator=torch.Generator().manual_seed(1))
    rate = 1 - float(sets.keep.float().mean())
    assert abs(rate - 0.25) < 0.02  # binomial sd ~0.007


@pytest.mark.parametrize("members_per_pass", [1, 3, None])
@pytest.mark.parametrize("bayesian", [False, True])
def test_streamed_set_loss_equals_the_single_pass_and_its_gradients(
    bayesian: bool, members_per_pass: int | None
) -> None:
    torch.manual_seed(0)
    net = BaseRegressor(1, 2, (3, 4))
    if bayesian:  # reparam: one weight sample per pass, replayed for every member
        net = dwp.bayesianize(net, dwp.NormalPrior(), init_log_sigma=-2.0)
    x, y = torch.randn(7, 1, 10, 10, 10), torch.rand(7, 2) * 5
    sets = draw_sets(7, 4, 0.3, generator=torch.Generator().manual_seed(2))
    members, target = set_members(x, sets), set_targets(y, sets)

    torch.manual_seed(11)
    net.zero_grad()
    loss, total = set_loss_backward(net, members, target, members_per_pass=members_per_pass)
    streamed = [p.grad.clone() for p in net.parameters()]

    # the twin: every member of every set in ONE forward pass, predictions summed per set
    torch.manual_seed(11)
    net.zero_grad()
    out = net(torch.cat(members)).view(len(members), len(sets), 2).sum(0)
    reference = F.mse_loss(out, target, reduction="sum")
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, out.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(streamed, (p.grad for p in net.parameters()), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if bayesian:
        assert any(n.endswith("log_sigma") for n, _ in net.named_parameters())

    # set_sum (the paper's one-graph replication) agrees too
    torch.manual_seed(11)
    torch.testing.assert_close(set_sum(net, members).detach(), total, rtol=1e-5, atol=1e-5)


def test_set_loss_is_not_the_per_sample_loss() -> None:
    # the point of Hydranet: errors of members can cancel inside a set
    torch.manual_seed(0)
    net = BaseRegressor(1, 1, (2, 2))
    x, y = torch.randn(4, 1, 6, 6, 6), torch.randn(4, 1)
    sets = draw_sets(4, 4, 0.0, generator=torch.Generator().manual_seed(0))
    loss, _ = set_loss_backward(net, set_members(x, sets), set_targets(y, sets))
    per_sample = F.mse_loss(net(x), y, reduction="sum").detach()
    assert not torch.allclose(loss, per_sample)


def test_bad_sets_and_targets_are_rejected() -> None:
    with pytest.raises(ValueError, match="p_zero"):
        draw_sets(4, 4, 1.0)
    net = BaseRegressor(1, 1, (2,))
    with pytest.raises(ValueError, match="target"):
        set_loss_backward(net, [torch.zeros(2, 1, 4, 4, 4)], torch.zeros(3, 1))
    with pytest.raises(ValueError, match="members"):
        set_loss_backward(net, [], torch.zeros(1, 1))
    with pytest.raises(ValueError, match="members_per_pass"):
        set_loss_backward(net, [torch.zeros(2, 1, 4, 4, 4)], torch.zeros(2, 1), members_per_pass=0)
    for members_per_pass in (1, None):  # the shape check holds on both paths
        with pytest.raises(ValueError, match="target"):
            set_loss_backward(
                net, [torch.zeros(2, 1, 4, 4, 4)] * 2, torch.zeros(3, 1),
                members_per_pass=members_per_pass,
            )  # fmt: skip
