"""
A minimal MONAI Deploy application for the VMAML-UNet bundle: 2D pictures in, PNG lesion masks out.

The graph is picture loader -> the SDK's ``MonaiBundleInferenceOperator`` -> mask writer. The inference operator
reads ``preprocessing``, ``inferer`` and ``postprocessing`` from the ``inference.json`` that ``ckpt_export`` stores
in the TorchScript model, drops the transforms whose class names contain ``LoadImage`` or ``SaveImage``, and runs
the rest in memory. The bundle's ``scripts`` package must be importable (it is when it sits next to this file, as
``docs/deploy.md`` assembles the application folder). Run with ``-i`` a picture or a folder of pictures, ``-o`` the
output folder and ``-m`` the ``model.ts``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from monai.deploy.conditions import CountCondition
from monai.deploy.core import (
    AppContext,
    Application,
    ExecutionContext,
    Fragment,
    Image,
    InputContext,
    IOType,
    Operator,
    OperatorSpec,
    OutputContext,
)
from monai.deploy.operators import BundleConfigNames, IOMapping, MonaiBundleInferenceOperator
from PIL import Image as PILImage

PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def list_pictures(input_path: Path) -> list[Path]:
    """
    The pictures to segment: ``input_path`` itself when it is a file, else the pictures directly inside it, by name.

    Raises:
        FileNotFoundError: when ``input_path`` does not exist.
        ValueError: when ``input_path`` is a folder without pictures.
    """
    if input_path.is_file():
        return [input_path]
    if not input_path.is_dir():
        raise FileNotFoundError(f"the input {input_path} does not exist.")
    pictures = sorted(p for p in input_path.iterdir() if p.is_file() and p.suffix.lower() in PICTURE_EXTENSIONS)
    if not pictures:
        raise ValueError(
            f"the input folder {input_path} holds no picture with an extension among {PICTURE_EXTENSIONS}."
        )
    return pictures


class PictureLoaderOperator(Operator):
    """
    Emit one picture per call, as an RGB ``Image`` of shape ``(W, H, 3)``, and its file name without the extension.

    The width comes first because MONAI's PIL reader, which loads the pictures in training and in ``inference.json``,
    orders a picture that way; the network then sees the pictures as it saw them in training.

    Named outputs:
        image: the picture, with its path in the metadata as ``filename_or_obj``.
        filename: the picture's file name without the extension, for naming the mask.

    Args:
        fragment: the application.
        pictures: the picture files, emitted in this order, one per call.
    """

    def __init__(self, fragment: Fragment, *args, pictures: list[Path], **kwargs) -> None:
        self._pictures = iter(pictures)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("image")
        spec.output("filename")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        path = next(self._pictures)
        with PILImage.open(path) as picture:
            # network_data_format's input is RGB: grey and palette pictures are expanded, an alpha channel dropped
            array = np.ascontiguousarray(np.asarray(picture.convert("RGB")).swapaxes(0, 1))
        op_output.emit(Image(array, metadata={"filename_or_obj": str(path)}), "image")
        op_output.emit(path.stem, "filename")


class MaskWriterOperator(Operator):
    """
    Write a binary mask of shape ``(W, H)`` with values 0/1 as ``<filename>_mask.png`` with values 0/255.

    Named inputs:
        seg_image: the mask ``Image`` from the inference operator, at the picture's size.
        filename: the picture's file name without the extension.

    Args:
        fragment: the application.
        output_folder: the folder for the masks; created when missing.
    """

    def __init__(self, fragment: Fragment, *args, output_folder: Path, **kwargs) -> None:
        self._output_folder = output_folder
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("seg_image")
        spec.input("filename")

    def compute(self, op_input: InputContext, op_output: OutputContext, context: ExecutionContext) -> None:
        mask = np.asarray(op_input.receive("seg_image").asnumpy())
        filename = op_input.receive("filename")
        self._output_folder.mkdir(parents=True, exist_ok=True)
        # back from the (W, H) order of MONAI's reader to the (H, W) rows and columns of a PNG
        PILImage.fromarray((mask.T > 0).astype(np.uint8) * 255).save(self._output_folder / f"{filename}_mask.png")


class VMAMLUNetApp(Application):
    """Segment the lesions in 2D pictures with the VMAML-UNet bundle's TorchScript model."""

    def compose(self) -> None:
        app_context: AppContext = Application.init_app_context(self.argv)
        pictures = list_pictures(Path(app_context.input_path))
        logging.info(f"segmenting {len(pictures)} picture(s) from {app_context.input_path}")

        loader = PictureLoaderOperator(self, CountCondition(self, len(pictures)), pictures=pictures, name="loader")
        # "image" and "pred" are the input and output names of network_data_format in the bundle's metadata.json
        inference = MonaiBundleInferenceOperator(
            self,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            app_context=app_context,
            bundle_config_names=BundleConfigNames(config_names=["inference"]),
            name="vmaml_unet",
        )
        writer = MaskWriterOperator(self, output_folder=Path(app_context.output_path), name="writer")

        self.add_flow(loader, inference, {("image", "image")})
        self.add_flow(inference, writer, {("pred", "seg_image")})
        self.add_flow(loader, writer, {("filename", "filename")})


if __name__ == "__main__":
    VMAMLUNetApp().run()
