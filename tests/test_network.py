"""VMAML-UNet network: VM-UNet parameter parity, shapes at any size, training/eval outputs, ablation switches."""

import pytest
import torch

from scripts.networks.blocks import PatchExpanding, PatchMerging
from scripts.networks.vmaml_unet import VMAMLUNet

TINY = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1), d_state=4)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_vm_unet_parameter_count():
    """With every VMAML addition off the network is VM-UNet: the public code's count at depths 2222/2221."""
    net = VMAMLUNet(in_channels=3, out_channels=1, wavelet_fusion="none", use_wcaa=False, kan_side_heads=False)
    assert count_parameters(net) == 27_427_561


def test_vmaml_additions_add_parameters():
    base = VMAMLUNet(wavelet_fusion="none", use_wcaa=False, kan_side_heads=False, **TINY)
    for switches in ({"wavelet_fusion": "parallel"}, {"use_wcaa": True}, {"kan_side_heads": True}):
        options = {"wavelet_fusion": "none", "use_wcaa": False, "kan_side_heads": False, **switches}
        assert count_parameters(VMAMLUNet(**options, **TINY)) > count_parameters(base), switches


@pytest.mark.parametrize("size", [(32, 32), (45, 70), (64, 33), (17, 100)])
@pytest.mark.parametrize("in_channels,out_channels", [(1, 1), (3, 1), (3, 3)])
def test_eval_output_shape_any_size(size, in_channels, out_channels):
    net = VMAMLUNet(in_channels=in_channels, out_channels=out_channels, **TINY).eval()
    with torch.no_grad():
        out = net(torch.randn(2, in_channels, *size))
    assert out.shape == (2, out_channels, *size)
    assert torch.isfinite(out).all()


def test_training_output_stacks_main_and_side_logits():
    net = VMAMLUNet(in_channels=3, out_channels=2, **TINY).train()
    out = net(torch.randn(2, 3, 40, 56))
    assert out.shape == (2, 4, 2, 40, 56)
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 40, 56)).shape == (2, 2, 40, 56)


def test_training_without_side_heads_returns_plain_logits():
    net = VMAMLUNet(kan_side_heads=False, **TINY).train()
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_eval_output_is_main_training_output():
    """Eval returns exactly the main logits that training mode stacks first (no dropout or drop path at rate 0)."""
    torch.manual_seed(0)
    net = VMAMLUNet(drop_path_rate=0.0, **TINY)
    x = torch.randn(1, 3, 48, 48)
    net.train()
    main_train = net(x)[:, 0]
    net.eval()
    torch.testing.assert_close(net(x), main_train)


def test_padding_does_not_leak_across_batch():
    """Each image is segmented independently of the others in the batch."""
    net = VMAMLUNet(**TINY).eval()
    x = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[1:], net(x[1:]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("wavelet_fusion", ["replace", "parallel", "none"])
@pytest.mark.parametrize("use_wcaa", [True, False])
def test_every_parameter_gets_a_gradient(wavelet_fusion, use_wcaa):
    """At 128x128 every stage's map is large enough for all of its default wavelet levels."""
    net = VMAMLUNet(wavelet_fusion=wavelet_fusion, use_wcaa=use_wcaa, **TINY).train()
    net(torch.randn(1, 3, 128, 128)).sum().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_default_network_runs():
    net = VMAMLUNet().eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 40, 40)).shape == (1, 1, 40, 40)


def test_torchscript_matches_eager():
    net = VMAMLUNet(**TINY).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 3, 40, 52)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=1e-4, atol=1e-4)


def test_patch_merging_and_expanding_shapes():
    x = torch.randn(2, 8, 6, 16)
    assert PatchMerging(16)(x).shape == (2, 4, 3, 32)
    assert PatchExpanding(16)(x).shape == (2, 16, 12, 8)
    assert PatchExpanding(16, scale=4)(x).shape == (2, 32, 24, 4)


def test_patch_expanding_places_channels_in_patches():
    """Channel group (p1, p2) of a pixel lands at offset (p1, p2) of its 2x2 output patch."""
    layer = PatchExpanding(4)
    with torch.no_grad():
        layer.expand.weight.zero_()
        layer.expand.weight[6, 0] = 1.0  # output channel 6 = group (p1=1, p2=1), channel 0 within the group
    layer.norm = torch.nn.Identity()
    x = torch.zeros(1, 1, 1, 4)
    x[..., 0] = 5.0
    out = layer(x)
    assert out.shape == (1, 2, 2, 2)
    assert out[0, 1, 1, 0] == 5.0
    assert out.abs().sum() == 5.0


@pytest.mark.parametrize(
    "kwargs",
    [{"dims": (8, 12, 32, 64)}, {"depths": (1, 1, 1)}, {"wavelet_fusion": "sideways"}, {"dims": (6, 12, 24, 48)}],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        VMAMLUNet(**{**TINY, **kwargs})
