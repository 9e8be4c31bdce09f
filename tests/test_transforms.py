"""
Bundle transforms: channel-first pictures, 2D squeezing, channel conversion, mask binarisation, and mask saving that
lines up with inputs.
"""

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from PIL import Image

from scripts.integrity import binarise, mask_values
from scripts.transforms import (
    CheckFinite,
    EnsureChannelFirst2D,
    EnsureChannels,
    EnsureSpatial2D,
    EnsureSpatial2Dd,
    MaskToLabel,
    MaskToLabeld,
    SaveImageMaskd,
    is_nifti,
)

AFFINE = np.array([[0.5, 0, 0, 10.0], [0, 0.7, 0, 20.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])


def _picture_with_a_corner_square(height: int = 30, width: int = 50) -> np.ndarray:
    """An asymmetric grey picture (height, width): a bright square at rows 2..9, columns 5..19."""
    picture = np.full((height, width), 20, dtype=np.uint8)
    picture[2:10, 5:20] = 230
    return picture


def _load(path: str) -> dict:
    """Load as the bundle's configs do, keeping the image's metadata."""
    loader = LoadImaged(keys="image", reader=["NibabelReader", "PILReader"])
    return Compose([loader, EnsureChannelFirstd(keys="image")])({"image": path})


@pytest.mark.parametrize(
    "shape,expected", [((30, 50), (1, 30, 50)), ((30, 50, 3), (3, 30, 50)), ((30, 50, 1), (1, 30, 50))]
)
def test_ensure_channel_first_2d_in_memory_pictures(shape, expected):
    """Arrays without a reader's original_channel_dim (MONAI Deploy hands them over in memory) are pictures."""
    picture = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    out = EnsureChannelFirst2D()(MetaTensor(picture))
    assert out.shape == expected
    torch.testing.assert_close(out.as_tensor(), picture.reshape(*shape[:2], -1).permute(2, 0, 1))


def test_ensure_channel_first_2d_follows_the_reader(tmp_path):
    """With a reader's metadata it is MONAI's EnsureChannelFirst: a grey PNG stays one channel of its (W, H) array."""
    Image.fromarray(_picture_with_a_corner_square()).save(tmp_path / "grey.png")
    loaded = LoadImaged(keys="image", reader="PILReader")({"image": str(tmp_path / "grey.png")})["image"]
    torch.testing.assert_close(
        EnsureChannelFirst2D()(loaded), EnsureChannelFirstd(keys="image")({"image": loaded})["image"]
    )


@pytest.mark.parametrize("shape", [(4, 5, 6, 7), (30, 50, 8)])
def test_ensure_channel_first_2d_rejects_non_pictures(shape):
    with pytest.raises(ValueError, match="original_channel_dim"):
        EnsureChannelFirst2D()(MetaTensor(torch.zeros(shape)))


@pytest.mark.parametrize(
    "channels,num_channels,expected",
    [(1, 3, 3), (3, 3, 3), (4, 3, 3), (2, 3, 3), (3, 1, 1), (4, 1, 1), (1, 1, 1), (2, 1, 1)],
)
def test_ensure_channels_counts(channels, num_channels, expected):
    image = torch.rand(channels, 6, 7)
    out = EnsureChannels(num_channels)(image)
    assert out.shape == (expected, 6, 7)


def test_ensure_channels_values():
    grey = torch.rand(1, 4, 5)
    np.testing.assert_allclose(EnsureChannels(3)(grey), grey.repeat(3, 1, 1))
    rgba = torch.rand(4, 4, 5)
    np.testing.assert_allclose(EnsureChannels(3)(rgba), rgba[:3])
    np.testing.assert_allclose(EnsureChannels(1)(rgba), rgba[:3].mean(0, keepdim=True), rtol=1e-6)


def test_ensure_channels_names_the_file_on_bad_input():
    image = MetaTensor(torch.rand(5, 4, 4), meta={"filename_or_obj": "/data/odd.tif"})
    with pytest.raises(ValueError, match="odd.tif.*5 channels"):
        EnsureChannels(3)(image)


def test_ensure_spatial_2d_squeezes_one_slice_volumes_and_keeps_the_affine():
    volume = MetaTensor(torch.rand(1, 6, 7, 1), affine=torch.as_tensor(AFFINE))
    out = EnsureSpatial2Dd(keys="image")({"image": volume})["image"]
    assert out.shape == (1, 6, 7)
    np.testing.assert_allclose(out.affine, AFFINE)
    assert EnsureSpatial2D()(torch.rand(3, 6, 7)).shape == (3, 6, 7)
    with pytest.raises(ValueError, match="scan.nii.*2D"):
        EnsureSpatial2D()(MetaTensor(torch.rand(1, 6, 7, 5), meta={"filename_or_obj": "scan.nii"}))


@pytest.mark.parametrize(
    "mask,expected",
    [
        (torch.tensor([[[0.0, 255.0], [255.0, 0.0]]]), [[0, 1], [1, 0]]),
        (torch.tensor([[[0.0, 1.0], [1.0, 0.0]]]), [[0, 1], [1, 0]]),
        (torch.tensor([[[3.0, 250.0], [252.0, 6.0]]]), [[0, 1], [1, 0]]),  # JPEG noise around 0 and 255
        (torch.tensor([[[0.0, 0.0], [255.0, 0.0]]]).repeat(3, 1, 1), [[0, 0], [1, 0]]),  # RGB mask
        (torch.zeros(1, 2, 2), [[0, 0], [0, 0]]),
    ],
)
def test_mask_to_label_binary(mask, expected):
    label = MaskToLabel(1)(mask)
    assert label.shape == (1, 2, 2) and label.dtype == torch.float32
    np.testing.assert_array_equal(label[0].numpy(), expected)


def test_mask_to_label_threshold_between_jpeg_noise():
    """Values above half the range are foreground; a few intermediate values (JPEG edges) are accepted."""
    mask = torch.zeros(1, 20, 20)
    mask[0, :10] = 255.0
    mask[0, 10, :3] = torch.tensor([130.0, 120.0, 200.0])
    label = MaskToLabel(1)(mask)
    assert label[0, :10].all() and not label[0, 11:].any()
    assert label[0, 10, :3].tolist() == [1.0, 0.0, 1.0]


def test_mask_to_label_and_data_preparation_draw_the_same_foreground():
    """A 16-bit mask with near-black noise: the noise is background in training as in the prepared data set."""
    mask = np.zeros((20, 20), dtype=np.uint16)
    mask[:4] = 65535
    mask[6, :3] = [200, 1000, 30000]  # noise, and one edge value (0.25% of the pixels, within the limit)
    label = MaskToLabel(1)(torch.as_tensor(mask.astype(np.float32))[None])
    np.testing.assert_array_equal(label[0].numpy().astype(bool), binarise(mask_values(Image.fromarray(mask))))
    assert label[0, :4].all() and not label[0, 4:].any()


def test_mask_to_label_rejects_non_binary_masks_and_ignores_alpha(caplog):
    ramp = MetaTensor(torch.linspace(0, 255, 100).reshape(1, 10, 10), meta={"filename_or_obj": "/data/ramp.png"})
    with pytest.raises(ValueError, match="ramp.png: not a binary mask"):
        MaskToLabel(1)(ramp)
    rgba = torch.zeros(4, 6, 6)
    rgba[3] = 255.0  # opaque alpha
    rgba[:3, :2] = 255.0
    label = MaskToLabel(1)(rgba)
    assert label[0, :2].all() and not label[0, 2:].any(), "alpha is no foreground"
    with caplog.at_level("INFO", logger="scripts.transforms"):
        MaskToLabel(1)(MetaTensor(torch.zeros(1, 4, 4), meta={"filename_or_obj": "/data/empty.png"}))
    assert "empty.png: the mask has no foreground" in caplog.text


def test_mask_to_labeld_checks_the_image_size():
    image = MetaTensor(torch.rand(3, 8, 6), meta={"filename_or_obj": "img.png"})
    mask = MetaTensor(torch.zeros(1, 8, 5), meta={"filename_or_obj": "mask.png"})
    with pytest.raises(ValueError, match=r"mask.png: the mask's spatial shape \(8, 5\) differs .*\(8, 6\) \(img.png\)"):
        MaskToLabeld(keys="label")({"image": image, "label": mask})
    out = MaskToLabeld(keys="label", image_key=None)({"image": image, "label": mask})
    assert out["label"].shape == (1, 8, 5)


@pytest.mark.parametrize(
    "bad,counts", [(float("nan"), "1 NaN and 0 infinite"), (float("-inf"), "0 NaN and 1 infinite")]
)
def test_check_finite(bad, counts):
    image = torch.rand(1, 5, 5)
    assert CheckFinite()(image) is image
    assert CheckFinite()(torch.full((2, 2), 3e38)) is not None, "an overflowing sum of finite values is accepted"
    image[0, 2, 3] = bad
    with pytest.raises(ValueError, match=f"scan.nii: the image holds {counts}"):
        CheckFinite()(MetaTensor(image, meta={"filename_or_obj": "scan.nii"}))


def test_ensure_channels_can_leave_grey_for_later():
    grey = torch.rand(1, 4, 5)
    assert EnsureChannels(3, expand_grey=False)(grey) is grey
    np.testing.assert_allclose(EnsureChannels(3, expand_grey=False)(torch.rand(4, 4, 5)).shape, (3, 4, 5))


def test_mask_to_label_multiclass():
    mask = torch.tensor([[[0.0, 2.0], [1.0, 2.0]]])
    np.testing.assert_array_equal(MaskToLabel(3)(mask)[0].numpy(), [[0, 2], [1, 2]])
    with pytest.raises(ValueError, match="class indices"):
        MaskToLabel(2)(MetaTensor(mask, meta={"filename_or_obj": "m.png"}))


def test_png_mask_lines_up_with_an_asymmetric_picture(tmp_path):
    """MONAI's PIL reader loads (W, H); the saved mask must still match the picture pixel for pixel."""
    picture = _picture_with_a_corner_square()
    path = tmp_path / "corner.png"
    Image.fromarray(picture).save(path)
    data = _load(str(path))
    assert data["image"].shape == (1, 50, 30), "MONAI's PILReader is expected to transpose to (W, H)"
    data["pred"] = MetaTensor((data["image"] > 127).float(), meta=dict(data["image"].meta))
    SaveImageMaskd(keys="pred", output_dir=str(tmp_path / "out"))(data)
    written = np.asarray(Image.open(tmp_path / "out" / "corner_mask.png"))
    assert written.shape == picture.shape
    np.testing.assert_array_equal(written, np.where(picture > 127, 255, 0))


@pytest.mark.parametrize("shape", [(30, 50), (30, 50, 1)])
def test_nifti_mask_keeps_shape_affine_and_alignment(tmp_path, shape):
    picture = _picture_with_a_corner_square().astype(np.float32).reshape(shape)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(picture, AFFINE), path)
    data = _load(str(path))
    data["image"] = EnsureSpatial2D()(data["image"])
    data["pred"] = MetaTensor((data["image"] > 127).float(), meta=dict(data["image"].meta))
    SaveImageMaskd(keys="pred", output_dir=str(tmp_path / "out"), save_overlay=True)(data)
    written = nib.load(tmp_path / "out" / "scan_mask.nii.gz")
    assert written.shape == shape
    np.testing.assert_allclose(written.affine, AFFINE, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(written.dataobj), (picture > 127).astype(np.uint8))
    overlay = Image.open(tmp_path / "out" / "scan_overlay.png")
    assert overlay.mode == "RGB"


def test_overlay_and_multiclass_png(tmp_path):
    picture = _picture_with_a_corner_square()
    path = tmp_path / "photo.JPG"
    Image.fromarray(np.stack([picture] * 3, axis=-1)).save(path, format="JPEG", quality=95)
    data = _load(str(path))
    image = data["image"] / 255.0
    data["pred"] = MetaTensor((image[:1] > 0.5).float() * 2, meta=dict(data["image"].meta))
    data["image"] = image
    SaveImageMaskd(keys="pred", output_dir=str(tmp_path), png_scale=None, save_overlay=True)(data)
    mask = np.asarray(Image.open(tmp_path / "photo_mask.png"))
    assert mask.shape == picture.shape and set(np.unique(mask)) == {0, 2}
    overlay = np.asarray(Image.open(tmp_path / "photo_overlay.png"))
    assert overlay.shape == (*picture.shape, 3)
    inside, outside = overlay[5, 10], overlay[20, 40]
    assert inside[0] > inside[1] + 50, "the mask is drawn in red"
    assert abs(int(outside[0]) - int(outside[1])) < 5, "outside the mask the picture stays grey"


def test_save_mask_rejects_plain_tensors(tmp_path):
    with pytest.raises(TypeError, match="MetaTensor"):
        SaveImageMaskd(keys="pred", output_dir=str(tmp_path))({"pred": torch.zeros(1, 4, 4)})


def test_is_nifti():
    assert is_nifti("a/b.NII.GZ") and is_nifti("x.nii") and not is_nifti("x.png") and not is_nifti("nii.png")
