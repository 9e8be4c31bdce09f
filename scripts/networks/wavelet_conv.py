"""Wavelet convolution (WTConv, Finder et al., "Wavelet Convolutions for Large Receptive Fields", ECCV 2024).

The 2-D discrete wavelet transform is a depthwise conv2d with stride 2 and its inverse the matching
conv_transpose2d. A WTConv applies small depthwise convolutions to the sub-bands of a multi-level
decomposition, so a k x k kernel at level i covers a (2^i k) x (2^i k) neighbourhood of the input.

Sub-bands stay in the transform's own (B, 4C, h, w) layout, the four bands of a channel next to each other, and
keep the memory format of the input: on channels-last maps (as SS2D and WCAA pass them) the depthwise
convolutions run several times faster than on channels-first ones (measured on CPU), and a 5-D band view would
make the convolutions lose the format.
"""

from typing import List, Tuple

import pywt
import torch
import torch.nn as nn
import torch.nn.functional as F  # noqa: N812

__all__ = ["create_wavelet_filters", "wavelet_transform", "inverse_wavelet_transform", "max_wavelet_levels", "WTConv2d"]


def _outer_filter_bank(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    # Row index = H, column index = W, so band 1 is high-pass along H and low-pass along W: pywt.dwt2's cH.
    return torch.stack([torch.outer(lo, lo), torch.outer(hi, lo), torch.outer(lo, hi), torch.outer(hi, hi)], dim=0)


def create_wavelet_filters(
    wavelet: str, channels: int, dtype: torch.dtype = torch.float64
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Build the depthwise 2-D analysis and synthesis filter banks of a PyWavelets discrete wavelet.

    Args:
        wavelet: PyWavelets name of a discrete wavelet, e.g. ``"db1"``.
        channels: number of image channels C; the four filters are repeated once per channel.
        dtype: dtype of the returned filters.

    Returns:
        ``(dec_filters, rec_filters)``, each of shape (4C, 1, L, L) with bands ordered LL, LH, HL, HH per channel,
        for use with ``groups=C`` in :func:`wavelet_transform` and :func:`inverse_wavelet_transform`.
    """
    wave = pywt.Wavelet(wavelet)
    # conv2d is a cross-correlation, so the analysis filters are reversed to make it a true convolution.
    dec_lo = torch.tensor(wave.dec_lo[::-1], dtype=dtype)
    dec_hi = torch.tensor(wave.dec_hi[::-1], dtype=dtype)
    # conv_transpose2d already flips its kernel relative to conv2d, so the synthesis filters are used as given.
    rec_lo = torch.tensor(wave.rec_lo, dtype=dtype)
    rec_hi = torch.tensor(wave.rec_hi, dtype=dtype)
    dec = _outer_filter_bank(dec_lo, dec_hi).unsqueeze(1).repeat(channels, 1, 1, 1)
    rec = _outer_filter_bank(rec_lo, rec_hi).unsqueeze(1).repeat(channels, 1, 1, 1)
    return dec, rec


def wavelet_transform(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """One level of the 2-D discrete wavelet transform.

    Odd H or W are first extended by replicating the last row or column: a replicated pair has no detail
    coefficient, so the padding adds no artificial edge to the high bands and does not dim the border of the
    LL band that the next level decomposes. :func:`inverse_wavelet_transform` crops it off again.

    Args:
        x: (B, C, H, W).
        filters: analysis filters (4C, 1, L, L) from :func:`create_wavelet_filters`.

    Returns:
        (B, 4C, ceil(H / 2), ceil(W / 2)): the sub-bands LL, LH, HL, HH of channel 0, then those of channel 1, ...
    """
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    if h % 2 == 1 or w % 2 == 1:
        x = F.pad(x, [0, w % 2, 0, h % 2], mode="replicate")
    pad = filters.shape[-1] // 2 - 1
    return F.conv2d(x, filters, stride=2, padding=pad, groups=c)


def inverse_wavelet_transform(x: torch.Tensor, filters: torch.Tensor, output_size: List[int]) -> torch.Tensor:
    """Inverse of :func:`wavelet_transform`.

    Args:
        x: sub-bands (B, 4C, h, w) as :func:`wavelet_transform` returns them.
        filters: synthesis filters (4C, 1, L, L) from :func:`create_wavelet_filters`.
        output_size: [H, W] of the signal before the forward transform (at most 2h x 2w); the replicate
            padding of odd sizes is cropped off.

    Returns:
        (B, C, H, W).
    """
    pad = filters.shape[-1] // 2 - 1
    y = F.conv_transpose2d(x, filters, stride=2, padding=pad, groups=x.shape[1] // 4)
    return y[:, :, : output_size[0], : output_size[1]]


def max_wavelet_levels(height: int, width: int) -> int:
    """Number of decomposition levels a (height, width) map allows: max(floor(log2(min(H, W))) - 1, 0).

    Integer arithmetic rather than ``math.log2`` so that exact powers of two never round down.
    """
    size = min(height, width)
    log2_size = 0
    while size >= 2:
        size = size // 2
        log2_size += 1
    return max(log2_size - 1, 0)


def _check_perfect_reconstruction(wavelet: str, dec: torch.Tensor, rec: torch.Tensor) -> None:
    # Zero padding at the borders breaks perfect reconstruction for every filter longer than two taps
    # (db2, sym4, ...), so rather than keep a list of accepted names the round trip is measured directly.
    generator = torch.Generator().manual_seed(0)
    for size in ([8, 8], [7, 9]):
        x = torch.randn([1, 1] + size, generator=generator, dtype=dec.dtype)
        error = (inverse_wavelet_transform(wavelet_transform(x, dec), rec, size) - x).abs().max().item()
        if error > 1e-10:
            raise ValueError(
                f"wavelet {wavelet!r} does not reconstruct perfectly with this transform (max error {error:.2e} "
                f"at size {size}); use a two-tap wavelet such as 'db1' (Haar)."
            )


class _SubbandConv(nn.Module):
    """Depthwise k x k convolution over the 4C sub-bands (B, 4C, h, w) of one level, then a learnable per-band scale."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels * 4, channels * 4, kernel_size, padding="same", groups=channels * 4, bias=False)
        # A small initial scale keeps the block close to its plain depthwise base convolution at the start.
        self.scale = nn.Parameter(torch.full((1, channels * 4, 1, 1), 0.1))

    def forward(self, bands: torch.Tensor) -> torch.Tensor:
        return self.conv(bands) * self.scale


class WTConv2d(nn.Module):
    """Depthwise wavelet convolution (WTConv), input and output shape (B, C, H, W) for any H, W >= 1.

    ``output = base_scale * depthwise_conv_k(x) + wavelet_path(x)``. At each level the current LL band is
    transformed (odd sizes replicate-padded); its raw LL band feeds the next level, and all four sub-bands go
    through a depthwise k x k convolution (no bias) times a per-band scale initialised to 0.1. Reconstruction
    runs coarsest first: the processed LL band plus the reconstruction from the level below, together with the
    processed high bands, is inverse-transformed and cropped to that level's input size.

    The number of levels used at run time is ``min(levels, max(floor(log2(min(H, W))) - 1, 0))``, so small
    maps use fewer levels (none at all below 4 x 4); parameters exist for all ``levels`` levels.

    Parameters (C = channels, k = kernel_size): base conv C*k*k weights + C bias (if ``bias``), ``base_scale``
    C, and per level 4C*k*k conv weights + 4C scales; in total ``C*k*k + C*bias + C + levels * (4C*k*k + 4C)``.
    The wavelet filters are buffers, not parameters.

    Args:
        channels: number of input and output channels C.
        kernel_size: size k of the depthwise kernels ('same' padding).
        levels: maximum number of wavelet decomposition levels (>= 0).
        wavelet: PyWavelets name; only wavelets that reconstruct perfectly (the Haar family, ``"db1"``) are
            accepted, others raise ``ValueError``.
        bias: whether the base depthwise convolution has a bias.
    """

    def __init__(
        self, channels: int, kernel_size: int = 3, levels: int = 1, wavelet: str = "db1", bias: bool = True
    ) -> None:
        super().__init__()
        if channels < 1 or kernel_size < 1 or levels < 0:
            raise ValueError(
                f"need channels >= 1, kernel_size >= 1, levels >= 0; got {channels}, {kernel_size}, {levels}."
            )
        dec, rec = create_wavelet_filters(wavelet, 1)
        _check_perfect_reconstruction(wavelet, dec, rec)
        self.channels = channels
        self.levels = levels
        dtype = torch.get_default_dtype()
        # Non-persistent: the filters are fixed functions of `wavelet`, so the state_dict holds only learned
        # tensors. They still follow .to()/.half() and are kept by torch.jit.script/save like any attribute.
        self.register_buffer("dec_filters", dec.repeat(channels, 1, 1, 1).to(dtype), persistent=False)
        self.register_buffer("rec_filters", rec.repeat(channels, 1, 1, 1).to(dtype), persistent=False)
        self.base_conv = nn.Conv2d(channels, channels, kernel_size, padding="same", groups=channels, bias=bias)
        self.base_scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.wavelet_convs = nn.ModuleList([_SubbandConv(channels, kernel_size) for _ in range(levels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_levels = min(self.levels, max_wavelet_levels(x.shape[-2], x.shape[-1]))
        bands: List[torch.Tensor] = []
        sizes: List[List[int]] = []
        ll = x
        for i, subband_conv in enumerate(self.wavelet_convs):
            if i < num_levels:
                sizes.append([ll.shape[-2], ll.shape[-1]])
                coeffs = wavelet_transform(ll, self.dec_filters)
                ll = coeffs[:, 0::4]
                bands.append(subband_conv(coeffs))

        out = self.base_scale * self.base_conv(x)
        if num_levels > 0:
            recon = torch.zeros_like(bands[-1][:, 0::4])
            for i in range(num_levels - 1, -1, -1):
                # Each level's processed bands are read once, here: adding the coarser reconstruction to their LL
                # band in place saves a copy of all four (no autograd node keeps the product it overwrites).
                coeffs = bands[i]
                coeffs[:, 0::4] += recon
                recon = inverse_wavelet_transform(coeffs, self.rec_filters, sizes[i])
            out = out + recon
        return out

    def extra_repr(self) -> str:
        return f"channels={self.channels}, levels={self.levels}"
