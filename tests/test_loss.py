"""KAN-regulated multiscale loss: every mode is finite, trains down, and reports its level weights."""

import pytest
import torch

from scripts.losses.multiscale_loss import KANMultiScaleLoss
from scripts.networks.vmaml_unet import VMAMLUNet


def make_batch(out_channels: int = 1, levels: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pred = torch.randn(2, levels, out_channels, 16, 16, generator=generator)
    if out_channels == 1:
        target = (torch.rand(2, 1, 16, 16, generator=generator) > 0.7).float()
    else:
        target = torch.randint(0, out_channels, (2, 1, 16, 16), generator=generator).float()
    return pred, target


@pytest.mark.parametrize("mode", ["kan_uncertainty", "fixed", "none"])
@pytest.mark.parametrize("out_channels", [1, 3])
def test_loss_decreases_on_a_fixed_batch(mode, out_channels):
    pred, target = make_batch(out_channels)
    logits = torch.nn.Parameter(pred)
    loss_fn = KANMultiScaleLoss(out_channels=out_channels, mode=mode)
    optimizer = torch.optim.Adam([logits, *loss_fn.parameters()], lr=0.05)
    values = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = loss_fn(logits, target)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        values.append(loss.item())
    assert values[-1] < values[0] - 0.1


def test_none_mode_is_the_main_loss_only():
    pred, target = make_batch()
    loss_fn = KANMultiScaleLoss(mode="none")
    assert loss_fn.level_weights is None
    main_only = loss_fn(pred[:, 0], target)
    torch.testing.assert_close(loss_fn(pred, target), main_only)
    assert list(loss_fn.parameters()) == []


def test_fixed_mode_weights_the_side_losses():
    pred, target = make_batch()
    weights = (0.5, 0.25, 0.125)
    loss_fn = KANMultiScaleLoss(mode="fixed", fixed_weights=weights)
    level = KANMultiScaleLoss(mode="none")
    expected = level(pred[:, 0], target) + sum(w * level(pred[:, k + 1], target) for k, w in enumerate(weights))
    torch.testing.assert_close(loss_fn(pred, target), expected)
    torch.testing.assert_close(loss_fn.level_weights, torch.tensor(weights))


def test_kan_uncertainty_weights_are_learned():
    pred, target = make_batch()
    loss_fn = KANMultiScaleLoss(mode="kan_uncertainty")
    params = list(loss_fn.parameters())
    assert params, "the weighting KAN must have parameters for the optimizer"
    loss_fn(pred, target).backward()
    assert all(p.grad is not None for p in params)
    before = loss_fn.level_weights.clone()
    assert before.shape == (3,) and (before > 0).all()
    optimizer = torch.optim.Adam(params, lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        loss_fn(pred, target).backward()
        optimizer.step()
    assert not torch.allclose(loss_fn.level_weights, before)


def test_kan_uncertainty_total_from_the_kan_of_the_level_features():
    """L = L_0 + sum_k (exp(-s_k) L_k + s_k), s_k the KAN of [L_k, L_0, position, batch-mean encoder statistics]."""
    pred, target = make_batch()
    statistics = torch.tensor([[[0.1, 1.0], [0.2, 1.5], [-0.3, 2.0]], [[0.3, 0.8], [0.0, 1.1], [0.5, 3.0]]])
    loss_fn = KANMultiScaleLoss(mode="kan_uncertainty", encoder_statistics=lambda: statistics)
    assert loss_fn.weighting.in_features == 5
    level = KANMultiScaleLoss(mode="none")
    main = level(pred[:, 0], target)
    sides = torch.stack([level(pred[:, k + 1], target) for k in range(3)])
    features = torch.cat(
        [torch.stack([sides, main.expand(3), torch.tensor([-1.0, 0.0, 1.0])], dim=-1), statistics.mean(dim=0)], dim=-1
    )
    s = loss_fn.weighting(features).squeeze(-1)
    torch.testing.assert_close(loss_fn(pred, target), main + (torch.exp(-s) * sides + s).sum())
    torch.testing.assert_close(loss_fn.level_weights, torch.exp(-s).detach())


def test_encoder_statistics_change_the_level_weights_without_a_gradient_path():
    pred, target = make_batch()
    statistics = torch.zeros(2, 3, 2)
    loss_fn = KANMultiScaleLoss(mode="kan_uncertainty", encoder_statistics=lambda: statistics)
    torch.nn.init.normal_(loss_fn.weighting.spline_weight, std=1.0)
    logits = pred.clone().requires_grad_()
    loss_fn(logits, target)
    before = loss_fn.level_weights.clone()
    statistics[:, :, 1] = 0.5
    loss_fn(logits, target).backward()
    assert not torch.allclose(loss_fn.level_weights, before)
    # The KAN's features are detached: the logits' gradient is only that of the weighted level losses.
    weights = loss_fn.level_weights
    logits_only = logits.detach().clone().requires_grad_()
    level = KANMultiScaleLoss(mode="none")
    (
        level(logits_only[:, 0], target) + sum(w * level(logits_only[:, k + 1], target) for k, w in enumerate(weights))
    ).backward()
    torch.testing.assert_close(logits.grad, logits_only.grad)


def test_the_network_feeds_its_encoder_statistics_to_the_loss():
    network = VMAMLUNet(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1), d_state=4).train()
    loss_fn = KANMultiScaleLoss(encoder_statistics=network.last_encoder_statistics)
    # The network is reached through a bound method, not as a submodule: its parameters stay out of the loss's.
    assert sum(p.numel() for p in loss_fn.parameters()) == 50
    target = (torch.rand(2, 1, 32, 32) > 0.5).float()
    with pytest.raises(ValueError, match="encoder statistics of the network.s last forward, but there are none"):
        loss_fn(torch.randn(2, 4, 1, 32, 32), target)
    loss = loss_fn(network(torch.randn(2, 3, 32, 32)), target)
    loss.backward()
    assert all(p.grad is not None for p in loss_fn.parameters())
    with pytest.raises(ValueError, match=r"shape \(1, 3, 2\)"):
        loss_fn(torch.randn(1, 4, 1, 32, 32), target[:1])


def test_side_output_modes_reject_plain_logits():
    pred, target = make_batch()
    with pytest.raises(ValueError, match="side outputs"):
        KANMultiScaleLoss(mode="kan_uncertainty")(pred[:, 0], target)
    with pytest.raises(ValueError, match="side outputs"):
        KANMultiScaleLoss(mode="fixed", num_side_outputs=2, fixed_weights=(1.0, 1.0))(pred, target)


@pytest.mark.parametrize("kwargs", [{"mode": "mean"}, {"mode": "fixed", "fixed_weights": (1.0,)}])
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        KANMultiScaleLoss(**kwargs)
