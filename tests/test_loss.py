"""KAN-regulated multiscale loss: every mode is finite, trains down, and reports its level weights."""

import pytest
import torch

from scripts.losses.multiscale_loss import KANMultiScaleLoss


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
