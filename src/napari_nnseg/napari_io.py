"""npe2 reader and writer contributions for NIfTI (``.nii``, ``.nii.gz``).

Why the plugin ships its own NIfTI reader: the network must see an image in nnU-Net's axis order and
spacing, and a labels layer must be saved back onto the scanner grid it came from. The reader therefore uses
:func:`napari_nnseg.image_files.read_image`'s conventions (array ``(z, y, x)`` = NIfTI ``(i, j, k)`` reversed,
spacing = header zooms reversed) and gives the layer ``scale`` = spacing and ``translate`` = the voxel-0
world position, both in ``(z, y, x)``. The full affine and header travel in ``metadata`` (``nifti_affine``,
``nifti_header``) because napari's scale/translate cannot hold a rotation; the plugin's labels layers copy
``nifti_affine`` from their image layer, so :func:`write_labels` writes them onto the exact source grid.

Nothing here imports napari: the functions only return layer-data tuples and file paths.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import NnsegError
from .image_files import NIFTI_ENDINGS, ImageGeometry, file_ending
from .image_files import write_labels as _write_labels_file

LayerDataTuple = tuple  # (data, kwargs, layer_type), as napari expects from a reader


def _is_nifti(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and file_ending(path).lower() in NIFTI_ENDINGS


def get_reader(path: str | os.PathLike | Sequence[str | os.PathLike]):
    """npe2 ``reader`` contribution: a function reading NIfTI files, or ``None`` for anything else."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_is_nifti(p) for p in paths):
        return None
    return read_nifti_layers


def read_nifti_layers(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[LayerDataTuple]:
    """Read NIfTI files as image layers with physical scale, translate and the full geometry in metadata.

    A 4-D file (channels last in NIfTI) becomes one layer per channel (``channel_axis=0``); a 2-D file a 2-D
    layer. Intensities keep the file's dtype (scaled by ``scl_slope``/``scl_inter``, like nnU-Net reads).
    """
    import nibabel as nib

    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: list[LayerDataTuple] = []
    for p in paths:
        p = Path(p)
        try:
            img = nib.load(str(p))
            data = np.asanyarray(img.dataobj)
        except Exception as exc:
            raise NnsegError(f"Cannot read {str(p)!r} as NIfTI ({type(exc).__name__}: {exc}).") from exc
        zooms = [float(z) for z in img.header.get_zooms()]
        while data.ndim > 3 and data.shape[-1] == 1:
            data, zooms = data[..., 0], zooms[:-1]
        if data.ndim not in (2, 3, 4):
            raise NnsegError(f"{str(p)!r} has shape {data.shape}; napari-nnseg reads 2-D, 3-D and 4-D NIfTI.")
        spatial = min(data.ndim, 3)
        data = data.transpose(tuple(range(data.ndim))[::-1])  # (x, y, z[, c]) -> ([c,] z, y, x)
        affine = np.asarray(img.affine, dtype=np.float64)
        scale = tuple(abs(z) for z in zooms[:spatial][::-1])
        translate = tuple(float(v) for v in affine[:spatial, 3][::-1])
        name = p.name[: -len(file_ending(p))]
        metadata = {
            "nifti_affine": affine,
            "nifti_header": img.header.copy(),
            "nifti_path": str(p),
            "nifti_shape": tuple(int(s) for s in data.shape[-spatial:]),
            "spacing": scale,
            "xyzt_units": tuple(str(u) for u in img.header.get_xyzt_units()),
        }
        kwargs: dict[str, Any] = {"name": name, "scale": scale, "translate": translate, "metadata": metadata}
        if data.ndim == 4:
            kwargs["channel_axis"] = 0
        layers.append((data, kwargs, "image"))
    return layers


def _geometry_from_layer(data: np.ndarray, meta: dict) -> ImageGeometry:
    """The grid to write a layer onto: the source header, else the source affine, else scale/translate."""
    metadata = meta.get("metadata") or {}
    spatial = data.ndim
    shape3 = (1, *data.shape) if spatial == 2 else tuple(data.shape)
    scale = [float(s) for s in (meta.get("scale") if meta.get("scale") is not None else [1.0] * spatial)]
    translate = [float(t) for t in (meta.get("translate") if meta.get("translate") is not None else [0.0] * spatial)]
    scale, translate = scale[-spatial:], translate[-spatial:]
    spacing = (max(scale) * 999, *scale) if spatial == 2 else tuple(scale)
    geometry = ImageGeometry(shape=shape3, spacing=tuple(spacing), file_ndim=spatial, kind="nifti")
    header = metadata.get("nifti_header")
    same_grid = tuple(metadata.get("nifti_shape", ())) == tuple(data.shape)
    affine = metadata.get("nifti_affine")
    if affine is not None:
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise NnsegError(f"metadata['nifti_affine'] must be a 4x4 matrix, got shape {affine.shape}.")
        geometry.affine = affine
        if header is not None and same_grid:
            geometry.header = header
    else:
        built = np.eye(4)
        for axis in range(spatial):  # array axis (z, y, x) -> NIfTI axis (x, y, z)
            nifti_axis = spatial - 1 - axis
            built[nifti_axis, nifti_axis] = scale[axis]
            built[nifti_axis, 3] = translate[axis]
        geometry.affine = built
    return geometry


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer ``writer`` for labels: save as NIfTI on the grid of the image the labels came from.

    ``meta['metadata']['nifti_affine']`` (copied from the image layer by the plugin) gives the exact source
    grid, with ``nifti_header`` when present; without them the affine is built from the layer's scale and
    translate, which reproduces what the reader made of an axis-aligned file. A name without a NIfTI ending
    gets ``.nii.gz``. uint8 unless a label is 255 or more (then uint16), like nnU-Net; written atomically.
    """
    path = str(path)
    if file_ending(path).lower() not in NIFTI_ENDINGS:
        path = path + ".nii.gz"
    array = np.asarray(data)
    if array.ndim not in (2, 3):
        raise NnsegError(f"Only 2-D and 3-D labels layers can be saved as NIfTI; this one has shape {array.shape}.")
    geometry = _geometry_from_layer(array, meta or {})
    _write_labels_file(path, array, geometry)
    return [path]
