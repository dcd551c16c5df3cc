"""Schema of a solar-cell inspection file and its conversion to image tensors.

A factory file holds one row per inspected cell: ``image``, the cell's electroluminescence
image as PNG bytes (8-bit grayscale, ``size`` x ``size`` pixels, as the line's camera software
writes it after cropping and downsampling), and the label ``defect`` (1 = defective). Files
written by ``factoryfed data make`` also carry ``cell_id``, ``module``, ``cell_type`` and
``defect_probability``; the model uses none of them, and a factory may omit them.

:class:`ImageSchema` adds the image checks to the tabular ones: every value must be PNG bytes
that decode to an 8-bit grayscale image of the task's size, so a corrupt, colour or wrongly
sized image is reported with the file, the column and the row instead of failing in training.
Pixels are scaled with fixed constants (:data:`~.source.PIXEL_MEAN`, :data:`~.source.PIXEL_STD`),
never with statistics of any factory's data.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import TensorDataset

from ..base import Column, DataValidationError, Schema
from .source import DEFAULT_IMAGE_SIZE, IMAGE, LABEL, PIXEL_MEAN, PIXEL_STD


@dataclass(frozen=True)
class ImageSchema(Schema):
    """A :class:`~standard_models.base.Schema` plus one column of PNG-encoded images.

    ``image_column`` must hold ``bytes``; each decodes to an 8-bit grayscale (PIL mode ``L``)
    image of exactly ``image_size`` x ``image_size`` pixels, which fixes shape, dtype (uint8)
    and range (0..255) of the model's input.
    """

    image_column: str = IMAGE
    image_size: int = DEFAULT_IMAGE_SIZE

    @property
    def names(self) -> list[str]:
        return [*super().names, self.image_column]

    def validate(self, df: pd.DataFrame, source: str | Path) -> None:
        """Tabular checks, then decode every image (see :func:`decode_images`)."""
        super().validate(df, source)
        decode_images(df, source, self.image_column, self.image_size)


def decode_images(
    df: pd.DataFrame, source: str | Path, column: str = IMAGE, size: int = DEFAULT_IMAGE_SIZE
) -> np.ndarray:
    """The images of ``df[column]`` as a ``(n, size, size)`` uint8 array.

    Raises :class:`DataValidationError` naming ``source``, the column and the first bad row:
    a missing column, a value that is not bytes, bytes that are not a readable image, an image
    that is not 8-bit grayscale, or one of another size.
    """
    if column not in df.columns:
        raise DataValidationError(source, "missing column", column)
    out = np.empty((len(df), size, size), dtype=np.uint8)
    for row, value in enumerate(df[column].to_numpy()):
        if not isinstance(value, bytes | bytearray | memoryview):
            raise DataValidationError(
                source, f"row {row}: expected PNG bytes, found {type(value).__name__}", column
            )
        try:
            with Image.open(io.BytesIO(value)) as img:
                img.load()
                mode, width, height = img.mode, img.width, img.height
                pixels = np.asarray(img) if mode == "L" else None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise DataValidationError(
                source, f"row {row}: not a readable image ({exc})", column
            ) from exc
        if mode != "L":
            raise DataValidationError(
                source, f"row {row}: image mode {mode}, expected 8-bit grayscale (L)", column
            )
        if (width, height) != (size, size):
            raise DataValidationError(
                source, f"row {row}: image is {width}x{height}, expected {size}x{size}", column
            )
        out[row] = pixels
    return out


def make_schema(image_size: int = DEFAULT_IMAGE_SIZE) -> ImageSchema:
    """The schema for cells of ``image_size`` pixels: ``image`` and a 0/1 ``defect``."""
    return ImageSchema(
        columns=(Column(LABEL, "int", low=0, high=1),), image_column=IMAGE, image_size=image_size
    )


SCHEMA = make_schema()


def scale_pixels(images: np.ndarray) -> np.ndarray:
    """Float32 ``(n, 1, h, w)`` inputs from uint8 ``(n, h, w)`` images, with the fixed scale."""
    x = (images.astype(np.float32) - np.float32(PIXEL_MEAN)) / np.float32(PIXEL_STD)
    return x[:, None, :, :]


def to_tensors(df: pd.DataFrame, image_size: int = DEFAULT_IMAGE_SIZE) -> TensorDataset:
    """x: float32 ``(n, 1, size, size)`` scaled pixels; y: int64 ``defect``."""
    if len(df) == 0:
        raise ValueError("the frame holds no cells")
    images = decode_images(df, "frame", IMAGE, image_size)
    y = df[LABEL].to_numpy(dtype=np.int64, copy=True)
    return TensorDataset(torch.from_numpy(scale_pixels(images)), torch.from_numpy(y))
