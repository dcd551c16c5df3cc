"""Electroluminescence images of solar cells (ELPV) and their split into factories.

Data: the ELPV data set, 2,624 electroluminescence (EL) images of mono- and polycrystalline
solar cells cut from 44 photovoltaic modules, 300x300 pixels, 8-bit grayscale, normalised for
size and perspective, each with an expert's defect probability (0, 1/3, 2/3 or 1) and the cell
type. It ships in the PyPI package ``elpv-dataset==1.0.0.post1`` (folder ``elpv_dataset/data``:
``labels.csv`` and ``images/cellNNNN.png``), so it installs offline. Data licence: Creative
Commons Attribution-NonCommercial-ShareAlike 4.0 (CC BY-NC-SA 4.0; commercial use needs the
authors' permission); the package's code is Apache-2.0. Please cite:

* C. Buerhop-Lutz, S. Deitsch, A. Maier, F. Gallwitz, S. Berger, B. Doll, J. Hauch, C. Camus
  and C.J. Brabec, "A Benchmark for Visual Identification of Defective Solar Cells in
  Electroluminescence Imagery", EU PVSEC 2018, doi:10.4229/35thEUPVSEC20182018-5CV.3.15;
* S. Deitsch, V. Christlein, S. Berger, C. Buerhop-Lutz, A. Maier, F. Gallwitz and C. Riess,
  "Automatic classification of defective photovoltaic module cells in electroluminescence
  images", Solar Energy 185, 2019, doi:10.1016/j.solener.2019.02.067;
* S. Deitsch, C. Buerhop-Lutz, E. Sovetkin, A. Steland, A. Maier, F. Gallwitz and C. Riess,
  "Segmentation of photovoltaic module cells in uncalibrated electroluminescence images",
  Machine Vision and Applications 32(4), 2021, doi:10.1007/s00138-021-01191-9.

Label: ``defect = 1`` when the defect probability is at least 0.5 (2/3 or 1), 821 of 2,624
cells (31%); the probability itself is kept in column ``defect_probability``.

Modules: the package gives no module ids, but the cells appear to be stored module by module:
the ten runs of one cell type are 60, 300, 180, 360, 714, 530, 72, 180, 48 and 180 cells long,
mostly whole modules of 60 cells (6x10). :func:`module_blocks` cuts every run of consecutive
same-type cells into ``ceil(length / 60)`` contiguous, near-equal blocks: 45 blocks of 36-60
cells, our stand-in for the 44 modules. All splits keep a block in one place, so cells of one
module (same production lot, same camera session) never sit on both sides of a split.

Server sets: within each cell type the blocks are ranked by defect rate and every third block
(ranks 1, 4, 7, ...) is held out, alternately for validation and for test: 15 blocks, about
a sixth of the cells each for validation and test, both stratified by cell type and defect
rate. The same blocks are held out under every scheme and seed.

Factories (``scheme="natural"``): a plant makes one cell type (mono- and polycrystalline lines
are different plants) and plants differ in defect rate. The training blocks of each type are
ranked by defect rate and cut into contiguous groups of near-equal size, one per plant, so
with four factories there are a mono plant with few defects, a mono plant with many, and the
same for poly. The number of mono plants follows the mono share of the cells (at least one of
each type from two factories on). Sizes follow the blocks, so ``quantity_skew`` is not applied
in this scheme. ``scheme="dirichlet"`` and ``"iid"`` deal out single training cells (label skew
on ``defect``, or at random), sized by ``quantity_skew``.

``feature_shift`` models plants whose EL cameras expose differently: every pixel of factory
``i`` becomes ``center + gain * (x - center) + offset * scale`` (one offset and gain per
factory, in units of the model's fixed input scale), clipped to 0..255.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..base import FederatedData, PartitionConfig
from ..common import package_folder
from ..partition import (
    STREAM_PARTITION,
    STREAM_SIZES,
    check_generate_args,
    contiguous_bounds,
    dirichlet_split,
    feature_shift_params,
    iid_split,
    rng_for,
    size_weights,
)

LABEL = "defect"
IMAGE = "image"
CELL = "cell_id"
MODULE = "module"
TYPE = "cell_type"
PROBABILITY = "defect_probability"
CELL_TYPES: tuple[str, ...] = ("mono", "poly")
SOURCE_SIZE = 300
DEFAULT_IMAGE_SIZE = 48
DEFECT_THRESHOLD = 0.5
MODULE_CELLS = 60
HOLDOUT_EVERY = 3
# Fixed input scale (mean and standard deviation of all 2,624 cells' pixels, in 0..255), the
# same for every party, so no statistic of any factory's data is shared.
PIXEL_MEAN = 152.0
PIXEL_STD = 40.0
CITATION = (
    "ELPV data set (elpv-dataset 1.0.0.post1, CC BY-NC-SA 4.0): Buerhop-Lutz et al., EU PVSEC "
    "2018; Deitsch et al., Solar Energy 2019; Deitsch et al., Machine Vision and Applications "
    "2021"
)


def data_dir() -> Path:
    """Folder holding ``labels.csv`` and ``images/`` inside the installed ``elpv_dataset``."""
    folder = package_folder(
        "elpv_dataset",
        "the solar-cell images need the package elpv-dataset==1.0.0.post1 "
        "(pip install elpv-dataset==1.0.0.post1)",
    ) / "data"
    if not (folder / "labels.csv").is_file():
        raise RuntimeError(f"elpv_dataset is installed but has no data/labels.csv at {folder}")
    return folder


@lru_cache(maxsize=1)
def labels() -> pd.DataFrame:
    """``labels.csv`` as a frame: ``cell_id``, ``defect_probability``, ``cell_type``, ``path``."""
    path = data_dir() / "labels.csv"
    raw = pd.read_csv(path, sep=r"\s+", header=None, names=["path", PROBABILITY, TYPE])
    bad = sorted(set(raw[TYPE]) - set(CELL_TYPES))
    if bad:
        raise RuntimeError(f"{path}: unknown cell types {bad}; expected {CELL_TYPES}")
    raw.insert(0, CELL, raw["path"].str.extract(r"(cell\d+)\.png$", expand=False))
    if raw[CELL].isna().any():
        raise RuntimeError(f"{path}: image paths not of the form images/cellNNNN.png")
    return raw


def module_blocks(types: np.ndarray, block: int = MODULE_CELLS) -> np.ndarray:
    """Block number of every cell: runs of one type cut into ``ceil(len / block)`` pieces."""
    types = np.asarray(types)
    out = np.empty(len(types), dtype=np.int64)
    start, next_id = 0, 0
    while start < len(types):
        stop = start
        while stop < len(types) and types[stop] == types[start]:
            stop += 1
        for a, b in contiguous_bounds(stop - start, math.ceil((stop - start) / block)):
            out[start + a : start + b] = next_id
            next_id += 1
        start = stop
    return out


def downsample(image: np.ndarray, size: int) -> np.ndarray:
    """A ``size`` x ``size`` uint8 copy of a grayscale image (area averaging)."""
    if image.shape == (size, size):
        return image.astype(np.uint8, copy=True)
    small = Image.fromarray(image).resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)


def load_images(rows: np.ndarray, size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """Images of the catalogue ``rows`` downsampled to ``size``, ``(len(rows), size, size)``."""
    folder = data_dir()
    paths = labels()["path"].to_numpy()
    out = np.empty((len(rows), size, size), dtype=np.uint8)
    for k, i in enumerate(rows):
        with Image.open(folder / paths[i]) as img:
            pixels = np.asarray(img)
        if pixels.shape != (SOURCE_SIZE, SOURCE_SIZE) or pixels.dtype != np.uint8:
            raise RuntimeError(
                f"{folder / paths[i]}: expected a {SOURCE_SIZE}x{SOURCE_SIZE} 8-bit grayscale "
                f"image, found shape {pixels.shape} and dtype {pixels.dtype}"
            )
        out[k] = downsample(pixels, size)
    return out


@lru_cache(maxsize=2)
def cell_images(size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """All cells' images, ``(2624, size, size)`` uint8, in ``labels.csv`` order (read once)."""
    out = load_images(np.arange(len(labels())), size)
    out.setflags(write=False)
    return out


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of one 8-bit grayscale image."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


def catalogue() -> pd.DataFrame:
    """One row per cell: ids, module block, type, defect probability and binary label."""
    lab = labels()
    df = pd.DataFrame(
        {
            CELL: lab[CELL].astype(str),
            MODULE: [f"m{b:02d}" for b in module_blocks(lab[TYPE].to_numpy())],
            TYPE: lab[TYPE].astype(str),
            PROBABILITY: lab[PROBABILITY].to_numpy(dtype=np.float64),
        }
    )
    df[LABEL] = (df[PROBABILITY] >= DEFECT_THRESHOLD).astype(np.int64)
    return df


def _block_table(cat: pd.DataFrame) -> pd.DataFrame:
    """Per block: type, cell count and defect rate, in block order."""
    return cat.groupby(MODULE, sort=True).agg(
        cell_type=(TYPE, "first"), cells=(LABEL, "size"), rate=(LABEL, "mean")
    )


def _ranked(blocks: pd.DataFrame, cell_type: str) -> list[str]:
    """Blocks of one type ordered by defect rate (ties by block name)."""
    sub = blocks[blocks[TYPE] == cell_type].reset_index()
    return list(sub.sort_values(["rate", MODULE], kind="stable")[MODULE])


def holdout_blocks(cat: pd.DataFrame) -> tuple[list[str], list[str]]:
    """``(validation, test)`` block names: every third block by defect rate within each type."""
    blocks = _block_table(cat)
    val, test = [], []
    for t, cell_type in enumerate(CELL_TYPES):
        held = _ranked(blocks, cell_type)[1::HOLDOUT_EVERY]
        for k, name in enumerate(held):
            (val if (k + t) % 2 == 0 else test).append(name)
    return sorted(val), sorted(test)


def _split_ranked(names: list[str], sizes: dict[str, int], parts: int) -> list[list[str]]:
    """Cut the ranked ``names`` into ``parts`` contiguous groups of near-equal cell counts."""
    if parts > len(names):
        raise ValueError(f"cannot make {parts} plants from {len(names)} module blocks")
    cum = np.cumsum([sizes[n] for n in names])
    cuts, lo = [], 0
    for j in range(1, parts):
        target = cum[-1] * j / parts
        cut = int(np.argmin(np.abs(cum - target))) + 1
        cut = min(max(cut, lo + 1), len(names) - (parts - j))  # one block per group at least
        cuts.append(cut)
        lo = cut
    edges = [0, *cuts, len(names)]
    return [names[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]


def natural_plants(
    cat: pd.DataFrame, train_blocks: list[str], num_factories: int
) -> list[list[str]]:
    """Training blocks of every plant under the natural split (see the module docstring)."""
    blocks = _block_table(cat).loc[sorted(train_blocks)]
    if num_factories == 1:
        return [sorted(train_blocks)]
    ranked = {t: _ranked(blocks, t) for t in CELL_TYPES}
    most = len(ranked["mono"]) + len(ranked["poly"])
    if num_factories > most:
        raise ValueError(
            f"the natural split of the solar cells has at most {most} factories (one training "
            f"module block each), got {num_factories}; use partition=iid or dirichlet for more"
        )
    mono_share = blocks.loc[ranked["mono"], "cells"].sum() / blocks["cells"].sum()
    n_mono = int(round(num_factories * mono_share))
    n_mono = min(max(n_mono, 1), num_factories - 1, len(ranked["mono"]))
    n_mono = max(n_mono, num_factories - len(ranked["poly"]))
    sizes = blocks["cells"].to_dict()
    return _split_ranked(ranked["mono"], sizes, n_mono) + _split_ranked(
        ranked["poly"], sizes, num_factories - n_mono
    )


def shift_images(images: np.ndarray, strength: float, seed: int, factory_index: int) -> np.ndarray:
    """Factory ``factory_index``'s images as if its camera exposed differently (see above)."""
    if strength <= 0:
        return images
    offsets, gains = feature_shift_params(1, strength, seed, factory_index)
    shifted = PIXEL_MEAN + gains[0] * (images.astype(np.float64) - PIXEL_MEAN)
    shifted = shifted + offsets[0] * PIXEL_STD
    return np.clip(np.rint(shifted), 0, 255).astype(np.uint8)


def _frame(cat: pd.DataFrame, rows: np.ndarray, images: np.ndarray) -> pd.DataFrame:
    """Catalogue rows (labels.csv numbers) with their PNG-encoded images, in cell order."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    if len(rows) == 0:
        raise ValueError("a factory received no cells")
    df = cat.loc[rows].reset_index(drop=True)
    df[IMAGE] = [encode_png(images[i]) for i in rows]
    return df


def generate(
    num_factories: int,
    seed: int,
    partition: PartitionConfig,
    image_size: int = DEFAULT_IMAGE_SIZE,
    cells_per_block: int | None = None,
) -> FederatedData:
    """Factories' frames and server validation/test frames of ``image_size``-pixel cells.

    ``cells_per_block`` keeps only the first cells of every module block (a small real slice
    for quick checks; the split logic is unchanged). Deterministic in ``seed``; ``natural``
    uses no randomness apart from ``feature_shift``.
    """
    check_generate_args(num_factories, seed, partition)
    size = int(image_size)
    cat = catalogue()
    if cells_per_block is None:
        images = cell_images(size)
    else:
        if cells_per_block < 1:
            raise ValueError(f"cells_per_block must be positive, got {cells_per_block}")
        cat = cat.groupby(MODULE, sort=False).head(int(cells_per_block))
        images = np.zeros((len(labels()), size, size), dtype=np.uint8)
        images[cat.index.to_numpy()] = load_images(cat.index.to_numpy(), size)
    val_blocks, test_blocks = holdout_blocks(cat)
    held = set(val_blocks) | set(test_blocks)
    train_blocks = sorted(set(cat[MODULE]) - held)
    modules = cat[MODULE]
    train_rows = cat.index.to_numpy()[~modules.isin(held).to_numpy()]
    if partition.scheme == "natural":
        plants = natural_plants(cat, train_blocks, num_factories)
        parts = [cat.index.to_numpy()[modules.isin(p).to_numpy()] for p in plants]
    else:
        weights = size_weights(num_factories, partition.quantity_skew, rng_for(seed, STREAM_SIZES))
        rng = rng_for(seed, STREAM_PARTITION)
        if partition.scheme == "dirichlet":
            labels_ = cat.loc[train_rows, LABEL].to_numpy()
            local = dirichlet_split(labels_, num_factories, partition.alpha, rng, weights, 20)
        else:
            local = iid_split(len(train_rows), weights, rng)
        parts = [train_rows[idx] for idx in local]
    factories = []
    for i, rows in enumerate(parts):
        shifted = images
        if partition.feature_shift > 0:
            shifted = images.copy()
            shifted[rows] = shift_images(images[rows], partition.feature_shift, seed, i)
        factories.append(_frame(cat, rows, shifted))
    validation = _frame(cat, cat.index.to_numpy()[modules.isin(val_blocks).to_numpy()], images)
    test = _frame(cat, cat.index.to_numpy()[modules.isin(test_blocks).to_numpy()], images)
    info = {
        "source": CITATION,
        "image_size": size,
        "factory_cell_types": [sorted(set(f[TYPE])) for f in factories],
        "factory_defect_rate": [float(f[LABEL].mean()) for f in factories],
        "validation_modules": val_blocks,
        "test_modules": test_blocks,
        "split": "module blocks of <= 60 consecutive same-type cells; every third block by "
        "defect rate within each type held out, alternately for validation and test",
    }
    return FederatedData(factories=factories, validation=validation, test=test, info=info)
