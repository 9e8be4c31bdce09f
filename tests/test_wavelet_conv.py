import io

import pytest
import pywt
import torch
from bundle_test_utils import randomise_parameters

from scripts.networks.wavelet_conv import (
    WTConv2d,
    create_wavelet_filters,
    inverse_wavelet_transform,
    max_wavelet_levels,
    wavelet_transform,
)


def test_transform_matches_pywavelets_dwt2():
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    dec, _ = create_wavelet_filters("db1", 3)
    bands = wavelet_transform(x, dec)
    assert bands.shape == (2, 12, 3, 4)
    for b in range(2):
        for c in range(3):
            ll, (lh, hl, hh) = pywt.dwt2(x[b, c].numpy(), "db1")
            for i, expected in enumerate((ll, lh, hl, hh)):
                torch.testing.assert_close(bands[b, 4 * c + i], torch.from_numpy(expected), rtol=0, atol=1e-12)


def test_filter_shapes():
    dec, rec = create_wavelet_filters("db1", 5)
    assert dec.shape == rec.shape == (20, 1, 2, 2)
    # Orthonormal Haar: the four analysis filters of one channel form an orthonormal basis of 2 x 2 blocks.
    basis = dec[:4].reshape(4, 4)
    torch.testing.assert_close(basis @ basis.T, torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("size", [(8, 8), (7, 9), (13, 13), (1, 5), (32, 17), (2, 3)])
@pytest.mark.parametrize("channels", [1, 3, 8])
def test_perfect_reconstruction(size, channels):
    x = torch.randn(2, channels, *size, dtype=torch.float64)
    dec, rec = create_wavelet_filters("db1", channels)
    bands = wavelet_transform(x, dec)
    assert bands.shape == (2, 4 * channels, (size[0] + 1) // 2, (size[1] + 1) // 2)
    torch.testing.assert_close(inverse_wavelet_transform(bands, rec, list(size)), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [(7, 9), (13, 13), (32, 32)])
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_output_shape(size, levels):
    module = WTConv2d(4, kernel_size=3, levels=levels)
    x = torch.randn(2, 4, *size)
    assert module(x).shape == x.shape


@pytest.mark.parametrize(
    "size, expected", [((1, 1), 0), ((3, 3), 0), ((4, 4), 1), ((7, 9), 1), ((8, 8), 2), ((13, 13), 2), ((32, 64), 4)]
)
def test_max_wavelet_levels(size, expected):
    assert max_wavelet_levels(*size) == expected


def test_level_cap_on_small_maps():
    deep = WTConv2d(3, levels=3)
    randomise_parameters(deep)
    one_level = WTConv2d(3, levels=1)
    # A 4x4 map allows one level, so the three-level module must equal a one-level one with the same weights.
    missing, unexpected = one_level.load_state_dict(deep.state_dict(), strict=False)
    assert not missing and unexpected
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(deep(x), one_level(x))
    # Below 4x4 no level fits and only the base branch remains.
    x = torch.randn(2, 3, 3, 2)
    torch.testing.assert_close(deep(x), deep.base_scale * deep.base_conv(x))


def _identity_subband_convs(module: WTConv2d) -> None:
    with torch.no_grad():
        module.base_scale.zero_()
        for level in module.wavelet_convs:
            level.conv.weight.zero_()
            level.conv.weight[:, :, 1, 1] = 1.0
            level.scale.fill_(1.0)


@pytest.mark.parametrize("size", [(8, 8), (9, 11), (13, 10)])
def test_wavelet_path_reconstructs_input(size):
    # Identity sub-band convs, no base branch: one level must give back x exactly (odd sizes too). With two
    # levels, level 2 reconstructs LL_1 exactly and adds it to LL_1, so the output is x + inverse(LL_1, 0, 0, 0).
    x = torch.randn(1, 2, *size, dtype=torch.float64)
    one = WTConv2d(2, levels=1).double()
    _identity_subband_convs(one)
    torch.testing.assert_close(one(x), x)

    two = WTConv2d(2, levels=2).double()
    _identity_subband_convs(two)
    bands = wavelet_transform(x, two.dec_filters)
    ll_only = bands * torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=x.dtype).repeat(2).view(1, 8, 1, 1)
    lowpass = inverse_wavelet_transform(ll_only, two.rec_filters, list(size))
    torch.testing.assert_close(two(x), x + lowpass)


def test_filters_are_buffers_not_parameters():
    module = WTConv2d(6, levels=2)
    buffers = dict(module.named_buffers())
    assert buffers["dec_filters"].shape == buffers["rec_filters"].shape == (24, 1, 2, 2)
    parameter_ids = {id(p) for p in module.parameters()}
    assert id(buffers["dec_filters"]) not in parameter_ids and id(buffers["rec_filters"]) not in parameter_ids
    assert not any("filters" in name for name in module.state_dict())


@pytest.mark.parametrize(
    "channels, kernel_size, levels, bias", [(4, 3, 1, True), (8, 5, 3, True), (3, 3, 2, False), (5, 3, 0, True)]
)
def test_parameter_count(channels, kernel_size, levels, bias):
    module = WTConv2d(channels, kernel_size=kernel_size, levels=levels, bias=bias)
    c, k = channels, kernel_size
    expected = c * k * k + (c if bias else 0) + c + levels * (4 * c * k * k + 4 * c)
    assert sum(p.numel() for p in module.parameters()) == expected


@pytest.mark.parametrize("wavelet", ["db2", "sym4", "coif1", "bior2.2"])
def test_non_perfect_reconstruction_wavelet_rejected(wavelet):
    with pytest.raises(ValueError, match="reconstruct"):
        WTConv2d(2, wavelet=wavelet)


@pytest.mark.parametrize("wavelet", ["haar", "bior1.1"])
def test_haar_aliases_accepted(wavelet):
    x = torch.randn(1, 2, 8, 8)
    reference = WTConv2d(2, levels=2)
    module = WTConv2d(2, levels=2, wavelet=wavelet)
    module.load_state_dict(reference.state_dict())
    torch.testing.assert_close(module(x), reference(x))


def test_gradients_reach_all_parameters():
    module = WTConv2d(3, kernel_size=3, levels=3)
    x = torch.randn(2, 3, 17, 16, requires_grad=True)  # min side 16 allows all three levels
    module(x).square().sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()


# torch.jit.script is deprecated upstream but is what MONAI's ckpt_export uses.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_matches_eager():
    module = WTConv2d(3, kernel_size=3, levels=3)
    randomise_parameters(module)
    scripted = torch.jit.script(module)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    for size in [(32, 32), (13, 13), (7, 9), (4, 4), (2, 3)]:
        x = torch.randn(2, 3, *size)
        expected = module(x)
        torch.testing.assert_close(scripted(x), expected)
        torch.testing.assert_close(loaded(x), expected)


@pytest.mark.parametrize("size", [(16, 16), (9, 14)])
def test_channels_last_input_keeps_its_format_and_values(size):
    """SS2D and WCAA pass channels-last maps, on which the depthwise convolutions are fastest on CPU: the output
    keeps that format and equals the channels-first result."""
    module = WTConv2d(8, levels=3)
    randomise_parameters(module)
    x = torch.randn(2, 8, *size)
    x_last = x.contiguous(memory_format=torch.channels_last)
    y_last = module(x_last)
    assert y_last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_last, module(x), rtol=1e-5, atol=1e-5)
    assert wavelet_transform(x_last, module.dec_filters).is_contiguous(memory_format=torch.channels_last)
