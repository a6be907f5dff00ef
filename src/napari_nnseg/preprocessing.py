"""Turning a user's image into the network's input, step for step as nnU-Net does it.

Order (NNUNET_FACTS.md §3.2): float32 copy, transpose, crop to the hole-filled nonzero box, normalise,
resample to the configuration's spacing. The user's array is only read: the first step copies it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_fill_holes

from .errors import NnsegError
from .normalization import normalize_channel
from .resampling import compute_new_shape, get_resampler


@dataclass
class Preprocessed:
    """The network input plus the geometry needed to put the prediction back where it came from.

    Shapes and spacings are in the *transposed* axis order nnU-Net works in.
    """

    data: np.ndarray  # (C, *resampled_shape) float32
    shape_before_cropping: tuple[int, ...]
    bbox: tuple[tuple[int, int], ...]
    shape_after_cropping: tuple[int, ...]
    original_spacing: tuple[float, ...]
    target_spacing: tuple[float, ...]


def nonzero_bbox(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Half-open bounding box of ``mask``; the full extent when it is empty (as nnU-Net's helper)."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        box.append((int(hit[0]), int(hit[-1]) + 1) if hit.size else (0, mask.shape[axis]))
    return tuple(box)


def as_channels_first(image: np.ndarray, n_channels: int, spatial_dims: int = 3) -> np.ndarray:
    """Accept ``(C, *spatial)`` or, for one-channel models, plain spatial data."""
    image = np.asarray(image)
    if image.ndim == spatial_dims and n_channels == 1:
        return image[None]
    if image.ndim == spatial_dims + 1 and image.shape[0] == n_channels:
        return image
    if image.ndim == spatial_dims + 1:
        raise NnsegError(f"The model expects {n_channels} channel(s) but the image has {image.shape[0]} "
                         f"along its first axis (shape {image.shape}). Pass (C, z, y, x) with C = {n_channels}.")
    raise NnsegError(f"Expected a {spatial_dims}-D image (or (C, z, y, x) for several channels), got shape "
                     f"{image.shape}. For a 2-D image add a leading axis of length 1.")


def preprocess(model, image: np.ndarray, spacing: Sequence[float],
               region: tuple[slice, ...] | None = None) -> Preprocessed:
    """Preprocess ``image`` (``(C, z, y, x)``) given its ``spacing`` in the same axis order.

    ``region`` (slices in the image's axes) predicts only part of the image while normalising with the
    statistics of the whole image, so a preview agrees with a full run there.
    """
    data = as_channels_first(image, model.num_input_channels)
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise NnsegError(f"The image has dtype {data.dtype}; a real-valued numeric image is needed.")
    spacing = [float(s) for s in spacing]
    if len(spacing) != data.ndim - 1:
        raise NnsegError(f"spacing has {len(spacing)} values but the image has {data.ndim - 1} spatial axes.")
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise NnsegError(f"spacing must be positive and finite, got {spacing}.")
    config = model.config
    tf = model.transpose_forward

    data = data.astype(np.float32)  # always a copy: the caller's array is never touched
    if not np.all(np.isfinite(data)):
        raise NnsegError("The image contains NaN or infinite values; replace them before segmenting.")
    data = data.transpose([0, *[i + 1 for i in tf]])
    original_spacing = tuple(spacing[i] for i in tf)
    shape_before_cropping = tuple(data.shape[1:])

    mask = data[0] != 0
    for c in range(1, data.shape[0]):
        mask |= data[c] != 0
    mask = binary_fill_holes(mask)
    bbox = nonzero_bbox(mask)
    slicer = tuple(slice(a, b) for a, b in bbox)
    data = data[(slice(None), *slicer)]
    mask = mask[slicer]

    schemes = config["normalization_schemes"]
    use_mask = config["use_mask_for_norm"]
    props = model.intensity_properties
    if len(schemes) < data.shape[0]:
        raise NnsegError(f"plans.json lists {len(schemes)} normalization scheme(s) for "
                         f"{data.shape[0]} input channel(s).")
    for c in range(data.shape[0]):
        data[c] = normalize_channel(data[c], schemes[c], bool(use_mask[c]), mask, props[c], c)

    if region is not None:
        bbox, data = _restrict_to_region(data, bbox, region, tf)

    shape_after_cropping = tuple(data.shape[1:])
    target = [float(s) for s in config["spacing"]]
    if len(target) < len(shape_after_cropping):
        target = [original_spacing[0], *target]
    new_shape = compute_new_shape(shape_after_cropping, original_spacing, target)
    resample = get_resampler(config["resampling_fn_data"], config.get("resampling_fn_data_kwargs"),
                             "plans.json resampling_fn_data")
    data = resample(data, new_shape, original_spacing, target)
    return Preprocessed(data=np.ascontiguousarray(data, dtype=np.float32),
                        shape_before_cropping=shape_before_cropping, bbox=bbox,
                        shape_after_cropping=shape_after_cropping, original_spacing=original_spacing,
                        target_spacing=tuple(target))


def _restrict_to_region(data, bbox, region, tf):
    """Intersect the nonzero box with a region given in the image's own axes."""
    if len(region) != len(bbox):
        raise NnsegError(f"region needs {len(bbox)} slices, one per spatial axis; got {len(region)}.")
    region_t = [region[i] for i in tf]
    new_box, local = [], []
    for (a, b), sl in zip(bbox, region_t):
        start = max(a, sl.start or 0)
        stop = min(b, sl.stop if sl.stop is not None else b)
        if stop <= start:
            raise NnsegError("The requested region holds no image content (it lies outside the nonzero part "
                             "of the image); move the view or the box onto the image.")
        new_box.append((start, stop))
        local.append(slice(start - a, stop - a))
    return tuple(new_box), data[(slice(None), *local)]
