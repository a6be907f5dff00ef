"""Between napari layers and the compute core's arrays, in both directions, without Qt.

Inbound: image layers become the core's ``(C, z, y, x)`` input, the spacing comes from the layer's scale, and a
preview region comes from the viewer's slice or a drawn box. Outbound: a ``PredictionResult`` becomes a Labels
layer (and optional image layers) that sits exactly on the image: same spatial transform, class names in
``features`` so hovering shows the class, a fixed colour per class, and provenance in ``metadata``. The widget
and :func:`napari_nnseg.segment` both go through here, so a scripted result looks exactly like a clicked one.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import NnsegError

if TYPE_CHECKING:
    from napari.layers import Image, Labels, Shapes

    from .model import NnUNetModel
    from .predictor import PredictionResult

# Distinct, colour-blind-friendly colours (Okabe-Ito, then Tol's bright); a class keeps its colour across runs.
_PALETTE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
            "#EE6677", "#228833", "#4477AA", "#CCBB44", "#66CCEE", "#AA3377"]
_TRANSPARENT = (0.0, 0.0, 0.0, 0.0)


@dataclass
class InputImage:
    """The core's input gathered from image layers, plus what is needed to map results back onto them.

    ``data`` is ``(C, z, y, x)``; it is a view of the layer's array where possible (the core copies before
    touching it). ``spatial_axes`` are the source layer's axes that ``z, y, x`` come from; ``added_z`` is
    True when a 2-D layer was given a z axis of length 1 (removed again from the results).
    """

    data: np.ndarray
    source: Image
    spatial_axes: tuple[int, ...]
    added_z: bool
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape[1:])


def _layer_array(layer: Image) -> np.ndarray:
    # Multiscale layers: the full-resolution level is what a model must see.
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    return np.asarray(data)


def _channels_first(layer: Image) -> tuple[np.ndarray, tuple[int, ...], bool, bool]:
    """(array as (C?, z, y, x), spatial layer axes, has channel axis, added z) for one layer."""
    data = _layer_array(layer)
    if getattr(layer, "rgb", False):
        data = np.moveaxis(data, -1, 0)
        spatial = tuple(range(data.ndim - 1))
        if len(spatial) == 2:
            return data[:, None], spatial, True, True
        return data, spatial, True, False
    if data.ndim == 2:
        return data[None], (0, 1), False, True
    if data.ndim == 3:
        return data, (0, 1, 2), False, False
    if data.ndim == 4:
        return data, (1, 2, 3), True, False
    raise NnsegError(f"Layer {layer.name!r} has shape {data.shape}; expected (z, y, x), (y, x), "
                     "(C, z, y, x) or an RGB image.")


def model_input(layers: Sequence[Image], n_channels: int, target_spacing: Sequence[float] = ()) -> InputImage:
    """Assemble the model's input from one image layer per input channel.

    A layer with a channel axis ((C, z, y, x) or RGB) supplies channel ``i`` of itself to model channel ``i``,
    so choosing the same multi-channel layer for every input fills them all. The spacing is the first
    layer's scale on its spatial axes; a 2-D layer gets the model's own z spacing (no resampling along z).
    """
    if len(layers) != n_channels:
        raise NnsegError(f"The model expects {n_channels} input channel(s) but {len(layers)} image layer(s) "
                         "were given; choose one image layer per channel.")
    if any(layer is None for layer in layers):
        raise NnsegError("Choose an image layer for every model input channel.")
    parts, info = [], []
    for i, layer in enumerate(layers):
        data, spatial, has_channels, added_z = _channels_first(layer)
        if has_channels and data.shape[0] != n_channels:
            raise NnsegError(f"Layer {layer.name!r} has {data.shape[0]} channels (shape {data.shape}) but "
                             f"the model expects {n_channels}; choose a single-channel layer per input.")
        parts.append(data[i] if has_channels else data)
        info.append((data, spatial, has_channels, added_z))
    shapes = {p.shape for p in parts}
    if len(shapes) > 1:
        listing = ", ".join(f"{layer.name!r} {p.shape}" for layer, p in zip(layers, parts))
        raise NnsegError(f"The input layers differ in spatial shape: {listing}. They must be co-registered.")
    first_data, spatial, first_has_channels, added_z = info[0]
    if first_has_channels and all(layer is layers[0] for layer in layers):
        stacked = first_data  # one multi-channel layer fills every input: keep the view, no copy
    elif n_channels == 1:
        stacked = parts[0][None]
    else:
        stacked = np.stack(parts)
    first = layers[0]
    scale = [float(s) for s in np.asarray(first.scale)[list(spatial)]]
    if added_z:
        z = float(target_spacing[0]) if len(target_spacing) == 3 else 1.0
        scale = [z, *scale]
    return InputImage(data=stacked, source=first, spatial_axes=spatial, added_z=added_z, spacing=tuple(scale))


def scale_looks_unset(spacing: Sequence[float], target_spacing: Sequence[float]) -> bool:
    """A layer scale of all ones while the model was trained at another spacing usually means a forgotten scale."""
    ones = all(math.isclose(float(s), 1.0) for s in spacing)
    return ones and not all(math.isclose(float(t), 1.0) for t in target_spacing)


# ---- geometry ------------------------------------------------------------------------------------------------


def spatial_transform(layer: Image, axes: Sequence[int]) -> dict[str, Any]:
    """The layer's scale, translate, rotate, shear, affine, units and axis labels restricted to ``axes``.

    Results have only the spatial axes; restricting every part of the transform (not just scale and translate)
    keeps them on the image when it is rotated, sheared or registered with an affine.
    """
    axes = list(axes)
    ndim = layer.ndim
    shear = np.asarray(layer.shear, dtype=float)
    if shear.ndim == 1:  # napari reports an upper-triangular shear as its off-diagonal entries
        full = np.eye(ndim)
        full[np.triu_indices(ndim, k=1)] = shear
        shear = full
    kwargs = {
        "scale": np.asarray(layer.scale, dtype=float)[axes],
        "translate": np.asarray(layer.translate, dtype=float)[axes],
        "rotate": np.asarray(layer.rotate, dtype=float)[np.ix_(axes, axes)],
        "shear": shear[np.ix_(axes, axes)],
        "affine": layer.affine.set_slice(axes).affine_matrix,
    }
    units = getattr(layer, "units", None)
    if units is not None:
        kwargs["units"] = tuple(str(units[i]) for i in axes)
    labels = getattr(layer, "axis_labels", None)
    if labels is not None:
        kwargs["axis_labels"] = tuple(labels[i] for i in axes)
    return kwargs


def _shift(transform: dict[str, Any], offset: Sequence[float]) -> dict[str, Any]:
    """Move a result that covers only part of the image to where that part lies (offset in data voxels)."""
    from napari.utils.transforms import Affine

    linear = Affine(scale=transform["scale"], rotate=transform["rotate"], shear=transform["shear"]).linear_matrix
    return {**transform, "translate": transform["translate"] + linear @ np.asarray(offset, dtype=float)}


def half_patch(model: NnUNetModel, spacing: Sequence[float]) -> tuple[float, float, float]:
    """Half the network's patch, in voxels of an image with ``spacing`` (z, y, x order of the image).

    The patch is defined at the model's target spacing in the transposed axis order nnU-Net works in; 2-D models
    see one slice at a time, so their half patch along the slicing axis is 0.
    """
    patch = [int(p) for p in model.patch_size]
    target = [float(s) for s in model.config["spacing"]]
    if len(patch) == 2:
        patch, target = [0, *patch], [0.0, *target]
    half = [0.0, 0.0, 0.0]
    for j, axis in enumerate(model.transpose_forward):
        half[axis] = patch[j] * target[j] / float(spacing[axis]) / 2
    return tuple(half)


def _spatial_world_axes(image: InputImage, world_ndim: int) -> list[int]:
    # napari aligns layers on their trailing axes.
    return [world_ndim - image.source.ndim + a for a in image.spatial_axes]


def _around(center: float, half: float, n: int) -> slice:
    c, h = int(round(center)), int(math.ceil(half))
    return slice(max(0, min(n - 1, c) - h), min(n, max(0, c) + h + 1))


def visible_region(image: InputImage, dims_point: Sequence[float], displayed: Iterable[int],
                   half: Sequence[float]) -> tuple[slice, ...]:
    """The displayed part of the image plus half a patch around the current slice on each sliced axis.

    Displayed axes are taken whole; a sliced spatial axis (the z of a volume in 2-D view) keeps the current
    slice and half a patch either side, so the network sees the context a full run would give that slice.
    """
    point = image.source.world_to_data(np.asarray(dims_point, dtype=float))
    world_axes = _spatial_world_axes(image, len(dims_point))
    displayed = set(displayed)
    region = [slice(0, 1)] if image.added_z else []
    h = half[1:] if image.added_z else half
    n = image.shape[1:] if image.added_z else image.shape
    for k, (layer_axis, world_axis) in enumerate(zip(image.spatial_axes, world_axes)):
        if world_axis in displayed:
            region.append(slice(0, n[k]))
        else:
            region.append(_around(point[layer_axis], h[k], n[k]))
    return tuple(region)


def box_region(image: InputImage, shapes: Shapes, half: Sequence[float], dims_point: Sequence[float]) -> tuple[
        slice, ...]:
    """The bounding box of the selected (else the last) shape, in the image's voxels.

    A rectangle drawn on one slice is flat along the sliced axis; there the box gets half a patch around it,
    as the visible-slice preview does.
    """
    if len(shapes.data) == 0:
        raise NnsegError(f"Shapes layer {shapes.name!r} holds no shape; draw a rectangle around the region.")
    index = max(shapes.selected_data) if shapes.selected_data else len(shapes.data) - 1
    # Axes the Shapes layer lacks (a 2-D box over a volume) take the current slice.
    world = np.asarray(dims_point, dtype=float)
    points = []
    for vertex in np.asarray(shapes.data[index]):
        w = world.copy()
        vw = np.asarray(shapes.data_to_world(vertex), dtype=float)
        w[len(w) - len(vw):] = vw
        points.append(image.source.world_to_data(w))
    points = np.array(points)
    region = [slice(0, 1)] if image.added_z else []
    h = half[1:] if image.added_z else half
    n = image.shape[1:] if image.added_z else image.shape
    for k, axis in enumerate(image.spatial_axes):
        lo, hi = points[:, axis].min(), points[:, axis].max()
        if hi - lo < 1:
            sl = _around((lo + hi) / 2, h[k], n[k])
        else:
            sl = slice(max(0, int(math.floor(lo))), min(n[k], int(math.ceil(hi)) + 1))
        if sl.stop <= sl.start:
            raise NnsegError(f"The box in {shapes.name!r} lies outside image {image.source.name!r}.")
        region.append(sl)
    return tuple(region)


# ---- results -> layers ---------------------------------------------------------------------------------------


def unique_name(existing: Iterable[str], base: str) -> str:
    """``base``, else ``base [2]``, ``base [3]``...: a result never takes (and so never replaces) a layer's name."""
    taken = set(existing)
    if base not in taken:
        return base
    k = 2
    while f"{base} [{k}]" in taken:
        k += 1
    return f"{base} [{k}]"


def class_color(value: int) -> str | tuple[float, ...]:
    """A fixed colour for a label value: the same class looks the same in every run and every image."""
    if value == 0:
        return _TRANSPARENT
    if value <= len(_PALETTE):
        return _PALETTE[value - 1]
    r, g, b = colorsys.hsv_to_rgb((value * 0.618033988749895) % 1.0, 0.65, 0.95)
    return (r, g, b, 1.0)


def class_colormap(class_names: dict[int, str]) -> dict[int | None, Any]:
    """A dict colormap (napari turns it into a ``DirectLabelColormap``); unknown values stay transparent."""
    colors: dict[int | None, Any] = {None: _TRANSPARENT}
    colors.update({int(v): class_color(int(v)) for v in class_names})
    return colors


def class_features(class_names: dict[int, str]) -> dict[str, list]:
    """``features`` with an ``index`` column: napari then shows the class name under the cursor."""
    values = sorted(int(v) for v in class_names)
    return {"index": values, "name": [str(class_names[v]) for v in values]}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _region_list(region: Sequence[slice] | None) -> list[list[int]] | None:
    return None if region is None else [[int(s.start), int(s.stop)] for s in region]


def _source_grid(image: InputImage, region: Sequence[slice] | None) -> dict[str, Any]:
    """The image's NIfTI geometry (from the plugin's reader), so saved labels land on the scanner grid.

    A region result starts elsewhere: its affine is shifted to the region's first voxel, and the header and
    shape (which describe the whole grid) are dropped.
    """
    meta = {k: v for k, v in (image.source.metadata or {}).items() if str(k).startswith("nifti_")}
    if region is None or "nifti_affine" not in meta:
        return meta
    affine = np.array(meta["nifti_affine"], dtype=float)
    offset_zyx = [s.start for s in (region[1:] if image.added_z else region)][-3:]
    offset_ijk = np.zeros(3)
    offset_ijk[: len(offset_zyx)] = offset_zyx[::-1]  # array (z, y, x) is NIfTI (k, j, i)
    affine[:3, 3] += affine[:3, :3] @ offset_ijk
    return {k: v for k, v in meta.items() if k not in ("nifti_header", "nifti_shape")} | {"nifti_affine": affine}


def result_layer_data(result: PredictionResult, image: InputImage, model: NnUNetModel, *,
                      existing_names: Iterable[str] = (), spacing: Sequence[float] | None = None,
                      region: Sequence[slice] | None = None, preview: bool = False) -> list[tuple]:
    """``(data, kwargs, layer_type)`` tuples: the Labels layer first, then optional image layers.

    Building tuples (not layers) keeps this testable without a viewer and lets one function add them.
    """
    names = set(existing_names)
    base = f"{image.source.name} {model.dataset_name}"
    transform = spatial_transform(image.source, image.spatial_axes)
    if region is not None:
        offset = [s.start for s in region]
        transform = _shift(transform, offset[1:] if image.added_z else offset)

    def squeeze(array: np.ndarray) -> np.ndarray:
        return array[..., 0, :, :] if image.added_z else array

    def name(suffix: str) -> str:
        chosen = unique_name(names, f"{base} {suffix}")
        names.add(chosen)
        return chosen

    provenance = _jsonable({
        **result.info, "image": image.source.name, "dataset": model.dataset_name,
        "spacing": [float(s) for s in (spacing if spacing is not None else image.spacing)],
        "region": _region_list(region), "preview": preview,
    })
    labels_kwargs = {
        "name": name("preview" if preview else "segmentation"), **transform,
        "features": class_features(result.class_names), "colormap": class_colormap(result.class_names),
        "metadata": {**_source_grid(image, region), "napari_nnseg": provenance}, "opacity": 0.6,
    }
    out: list[tuple] = [(squeeze(result.labels), labels_kwargs, "labels")]
    image_kwargs = {**transform, "blending": "additive", "contrast_limits": (0.0, 1.0), "visible": True}
    if result.probabilities is not None:
        labels = model.labels
        values = list(labels.regions_class_order) if labels.has_regions else labels.all_labels
        for channel, value in enumerate(values):
            if value == 0 and not labels.has_regions:
                continue  # background probability is one minus the rest
            out.append((squeeze(result.probabilities[channel]),
                        {**image_kwargs, "name": name(f"p({result.class_names.get(value, value)})"),
                         "colormap": "gray", "visible": False, "metadata": {"napari_nnseg": provenance}},
                        "image"))
    if result.uncertainty is not None:
        out.append((squeeze(result.uncertainty),
                    {**image_kwargs, "name": name("uncertainty"), "colormap": "inferno",
                     "metadata": {"napari_nnseg": {**provenance, "map": "normalised entropy"}}}, "image"))
    if result.fold_disagreement is not None:
        out.append((squeeze(result.fold_disagreement),
                    {**image_kwargs, "name": name("fold disagreement"), "colormap": "magma", "visible": False,
                     "metadata": {"napari_nnseg": {**provenance, "map": "fraction of folds disagreeing"}}},
                    "image"))
    return out


def add_result_layers(viewer, result: PredictionResult, image: InputImage, model: NnUNetModel, *,
                      spacing: Sequence[float] | None = None, region: Sequence[slice] | None = None,
                      preview: bool = False) -> Labels:
    """Add the result's layers to ``viewer`` (never replacing one) and return the Labels layer."""
    from napari.layers import Image, Labels

    tuples = result_layer_data(result, image, model, existing_names=[lay.name for lay in viewer.layers],
                               spacing=spacing, region=region, preview=preview)
    added = []
    for data, kwargs, kind in tuples:
        layer = Labels(data, **kwargs) if kind == "labels" else Image(data, **kwargs)
        viewer.layers.append(layer)
        added.append(layer)
    return added[0]
