"""Reading images from files and writing labels next to them, with nnU-Net's axis and spacing conventions.

Why this module is careful about axes: nnU-Net's default reader (``SimpleITKIO``) hands the network the array
``sitk.GetArrayFromImage`` returns, i.e. ``(z, y, x)`` = NIfTI's ``(i, j, k)`` voxel axes reversed, and the
spacing ``GetSpacing()[::-1]`` (the header's float32 ``pixdim`` values as float64). An image that reaches the
network in another orientation or spacing gives other labels, silently. So :func:`read_image` reads NIfTI with
nibabel but returns exactly what ``SimpleITKIO().read_images`` returns for the same file (tested against it,
including oblique affines, scaled integer data, 2-D and 4-D files), and :func:`write_labels` writes the
labels back onto the source file's own voxel grid (its header and affine), as ``SimpleITKIO.write_seg`` does.

TIFF (``.tif``/``.tiff``) and ``.npy`` are read too: spacing comes from an nnU-Net style sidecar
``CASE.json`` (``{"spacing": [z, y, x]}``, what nnU-Net's ``Tiff3DIO`` reads), else from ImageJ or OME
metadata for TIFF, else 1.

Every write goes to a temporary name in the destination folder and is renamed when complete, so an
interrupted run never leaves a half-written file under the final name.

No napari or torch import here: the CLI, the batch runner and the napari reader/writer all use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import NnsegError

NIFTI_ENDINGS = (".nii.gz", ".nii")
TIFF_ENDINGS = (".tif", ".tiff")
NPY_ENDINGS = (".npy",)
SUPPORTED_ENDINGS = NIFTI_ENDINGS + TIFF_ENDINGS + NPY_ENDINGS

# nnU-Net gives a 2-D image a dummy slice axis with this factor times the largest in-plane spacing
# (SimpleITKIO.read_images), so the slice axis is never resampled.
_2D_SPACING_FACTOR = 999

_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")


# ----------------------------------------------------------------------------------------------------------
# file names
# ----------------------------------------------------------------------------------------------------------


def file_ending(path: str | os.PathLike) -> str:
    """The supported ending of ``path`` as spelled in the name (``.nii.gz``, ``.TIF``), or ``""``.

    ``Path.suffix`` would say ``.gz`` for ``.nii.gz``; nnU-Net names outputs ``CASE + ending``, so the whole
    ending matters.
    """
    name = Path(path).name
    lower = name.lower()
    for ending in SUPPORTED_ENDINGS:
        if lower.endswith(ending) and len(name) > len(ending):
            return name[-len(ending):]
    return ""


def _kind_of(path: str | os.PathLike) -> str:
    ending = file_ending(path).lower()
    if ending in NIFTI_ENDINGS:
        return "nifti"
    if ending in TIFF_ENDINGS:
        return "tiff"
    if ending in NPY_ENDINGS:
        return "npy"
    raise NnsegError(f"{str(path)!r} is not a supported image file. Use NIfTI (.nii.gz, .nii), TIFF (.tif, "
                     f".tiff) or NumPy (.npy).")


def _sidecar_json(path: Path) -> Path:
    """nnU-Net's Tiff3DIO convention: ``CASE_0000.tif`` -> ``CASE.json``, ``name.tif`` -> ``name.json``."""
    stem = path.name[: -len(file_ending(path))]
    return path.with_name(_CHANNEL_SUFFIX.sub("", stem) + ".json")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; rename it to ``path`` only if the block succeeds.

    The temporary name keeps the file's ending (nibabel picks gzip from it, numpy appends ``.npy`` without it)
    and starts with a dot so folder scans and ``--continue`` ignore it. On any exception, including
    ``KeyboardInterrupt``, the partial file is removed and nothing appears under the final name.
    """
    path = Path(path)
    ending = file_ending(path) or "".join(path.suffixes[-1:])
    tmp = path.with_name(f".{path.name[: len(path.name) - len(ending)]}.partial-{uuid.uuid4().hex[:8]}{ending}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# ----------------------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ImageGeometry:
    """Where an image's voxels lie, kept so labels can be written onto the same grid.

    ``shape`` and ``spacing`` are in the array order :func:`read_image` returns (``(z, y, x)``; a 2-D file
    has ``z == 1`` and nnU-Net's dummy slice spacing). ``affine`` is the NIfTI voxel ``(i, j, k) = (x, y, z)``
    to RAS+ world matrix (for other formats: one built from the spacing), and ``header`` the source NIfTI
    header, re-used for the labels so viewers overlay them exactly.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    file_ndim: int = 3
    files: tuple[str, ...] = ()
    kind: str = "array"
    ending: str = ".nii.gz"
    affine: np.ndarray | None = None
    header: Any = field(default=None, repr=False)
    spacing_source: str = "given"
    unit: str | None = None
    sidecar: bool = False

    @property
    def origin(self) -> tuple[float, ...]:
        """World position of voxel 0 in array order ``(z, y, x)`` (what napari calls ``translate``)."""
        if self.affine is None:
            return (0.0,) * len(self.shape)
        return tuple(float(v) for v in np.asarray(self.affine)[:3, 3][::-1])

    def nifti_affine(self) -> np.ndarray:
        """The affine to write NIfTI with: the source's, else one from the spacing (no rotation)."""
        if self.affine is not None:
            return np.asarray(self.affine, dtype=np.float64)
        affine = np.eye(4)
        if self.file_ndim == 2:
            affine[0, 0], affine[1, 1] = self.spacing[2], self.spacing[1]
        else:
            affine[0, 0], affine[1, 1], affine[2, 2] = self.spacing[2], self.spacing[1], self.spacing[0]
        return affine


def geometry_for_array(shape: Sequence[int], spacing: Sequence[float], ending: str = ".nii.gz",
                       origin: Sequence[float] | None = None) -> ImageGeometry:
    """Geometry for an in-memory ``(z, y, x)`` array (e.g. the demo sample) so it can be written as a file."""
    shape = tuple(int(s) for s in shape)[-3:]
    spacing = tuple(float(s) for s in spacing)[-3:]
    if len(shape) != 3 or len(spacing) != 3:
        raise NnsegError(f"Need a (z, y, x) shape and spacing, got shape {shape} and spacing {spacing}.")
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    if origin is not None:
        affine[:3, 3] = [float(v) for v in origin][::-1]
    return ImageGeometry(shape=shape, spacing=spacing, kind="array", ending=ending, affine=affine)


# ----------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _OneFile:
    array: np.ndarray  # (C, z, y, x), file dtype (scaled for NIfTI)
    spacing: tuple[float, ...]  # (z, y, x)
    file_ndim: int
    affine: np.ndarray | None = None
    header: Any = None
    spacing_source: str = "header"
    unit: str | None = None
    sidecar: bool = False


def _as_zyx_with_2d(data: np.ndarray, spacing_zyx_or_yx: Sequence[float], path: Path) -> tuple[np.ndarray, tuple]:
    """``(y, x)`` -> ``(1, 1, y, x)`` with nnU-Net's dummy slice spacing; ``(z, y, x)`` -> ``(1, z, y, x)``."""
    if data.ndim == 2:
        sy, sx = (float(s) for s in spacing_zyx_or_yx[-2:])
        return data[None, None], (max(sx, sy) * _2D_SPACING_FACTOR, sy, sx)
    if data.ndim == 3:
        return data[None], tuple(float(s) for s in spacing_zyx_or_yx[-3:])
    if data.ndim == 4:
        return data, tuple(float(s) for s in spacing_zyx_or_yx[-3:])
    raise NnsegError(f"{str(path)!r} has {data.ndim} dimensions; napari-nnseg reads 2-D and 3-D images "
                     "(a 4-D file holds channels).")


def _read_nifti(path: Path) -> _OneFile:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)  # applies scl_slope/inter like ITK does
    except Exception as exc:  # nibabel raises ImageFileError, EOFError, zlib/gzip errors, OSError...
        raise NnsegError(f"Cannot read {str(path)!r} as NIfTI ({type(exc).__name__}: {exc}). The file may be "
                         "truncated or not a NIfTI image; re-export or re-copy it.") from exc
    zooms = [float(z) for z in img.header.get_zooms()]  # float32 pixdim -> float64, like GetSpacing()
    # ITK drops trailing singleton dimensions beyond the third (x, y, z, 1) -> 3-D.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
        zooms = zooms[:-1]
    if data.ndim > 4:
        raise NnsegError(f"{str(path)!r} has shape {data.shape}; napari-nnseg reads 2-D, 3-D and 4-D "
                         "(channels last) NIfTI files.")
    file_ndim = min(data.ndim, 3)
    # nibabel (x, y, z[, c]) -> SimpleITK's array order ([c,] z, y, x); spacing reversed likewise.
    data = data.transpose(tuple(range(data.ndim))[::-1])
    spacing = zooms[:file_ndim][::-1]
    array, spacing = _as_zyx_with_2d(data, spacing, path)
    spacing = tuple(abs(s) for s in spacing)
    return _OneFile(array, spacing, file_ndim, affine=np.asarray(img.affine, dtype=np.float64),
                    header=img.header.copy(), spacing_source="header")


def _sidecar_spacing(path: Path) -> tuple[float, float, float] | None:
    side = _sidecar_json(path)
    if not side.is_file():
        return None
    try:
        spacing = json.loads(side.read_text(encoding="utf-8"))["spacing"]
        spacing = tuple(float(s) for s in spacing)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NnsegError(f"{str(side)!r} should hold {{\"spacing\": [z, y, x]}} for {path.name} ({exc}).") from exc
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise NnsegError(f"{str(side)!r}: spacing must be 3 positive numbers (z, y, x), got {list(spacing)}.")
    return spacing  # type: ignore[return-value]


def _ome_spacing(xml: str) -> tuple[tuple[float, float, float], str | None] | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for elem in root.iter():
        if elem.tag.rsplit("}", 1)[-1] == "Pixels":
            get = elem.attrib.get
            if not any(get(f"PhysicalSize{a}") for a in "XYZ"):
                return None
            spacing = tuple(float(get(f"PhysicalSize{a}", 1.0)) for a in "ZYX")
            return spacing, get("PhysicalSizeXUnit", "µm")  # type: ignore[return-value]
    return None


def _read_tiff(path: Path) -> _OneFile:
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            series = tif.series[0]
            data = series.asarray()
            axes = series.axes.upper()
            page = tif.pages[0]
            rgb = getattr(page, "photometric", None) in (tifffile.PHOTOMETRIC.RGB,)
            imagej = tif.imagej_metadata if tif.is_imagej else None
            ome = tif.ome_metadata if tif.is_ome else None
            resolution = getattr(page, "resolution", None)
    except Exception as exc:
        raise NnsegError(f"Cannot read {str(path)!r} as TIFF ({type(exc).__name__}: {exc}).") from exc

    # Map the series' axes to (C, z, y, x). nnU-Net's Tiff3DIO treats any 3-D TIFF as (z, y, x); we do too,
    # except that a real channel axis ('C', or RGB samples) becomes channels.
    if len(axes) != data.ndim:
        axes = "Q" * (data.ndim - 2) + "YX"
    keep = [i for i, a in enumerate(axes) if data.shape[i] > 1 or a in "YX"]
    data = data.reshape([data.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    channel = "C" if "C" in axes else ("S" if ("S" in axes and rgb) else None)
    rest = [a for a in axes if a not in "YX" and a != channel]
    z_axis = "Z" if "Z" in rest else (rest[0] if len(rest) == 1 else None)
    extra = [a for a in rest if a != z_axis]
    if extra or "Y" not in axes or "X" not in axes:
        raise NnsegError(f"{str(path)!r} has axes {axes} (shape {data.shape}); napari-nnseg reads one 2-D or 3-D "
                         "image per TIFF, optionally with channels. Save each volume as its own file.")
    order = [axes.index(a) for a in (channel, z_axis, "Y", "X") if a is not None]
    data = data.transpose(order)
    if channel is None:
        data = data[None]
    if z_axis is None:
        data = data[:, None]

    unit = None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    source = "default"
    side = _sidecar_spacing(path)
    if side is not None:
        spacing, source = side, "sidecar"
    elif ome is not None and _ome_spacing(ome) is not None:
        spacing, unit = _ome_spacing(ome)  # type: ignore[misc]
        source = "ome"
    elif imagej is not None and (imagej.get("spacing") or (resolution and tuple(resolution) != (1.0, 1.0))):
        sz = float(imagej.get("spacing", 1.0) or 1.0)
        xres, yres = (float(r) for r in (resolution or (1.0, 1.0)))
        spacing = (sz, 1.0 / yres if yres > 0 else 1.0, 1.0 / xres if xres > 0 else 1.0)
        unit, source = imagej.get("unit"), "imagej"
    file_ndim = 2 if z_axis is None else 3
    if file_ndim == 2:
        spacing = (max(spacing[1], spacing[2]) * _2D_SPACING_FACTOR, spacing[1], spacing[2])
    return _OneFile(data, spacing, file_ndim, spacing_source=source, unit=unit, sidecar=source == "sidecar")


def _read_npy(path: Path) -> _OneFile:
    try:
        data = np.load(str(path), allow_pickle=False)
    except Exception as exc:
        raise NnsegError(f"Cannot read {str(path)!r} as a NumPy array ({type(exc).__name__}: {exc}).") from exc
    side = _sidecar_spacing(path)
    spacing = side or (1.0, 1.0, 1.0)
    file_ndim = 2 if data.ndim == 2 else 3
    array, spacing = _as_zyx_with_2d(data, spacing, path)
    return _OneFile(array, spacing, file_ndim, spacing_source="sidecar" if side else "default",
                    sidecar=side is not None)


def read_image(path_or_paths: str | os.PathLike | Sequence[str | os.PathLike]
               ) -> tuple[np.ndarray, tuple[float, float, float], ImageGeometry]:
    """Read one image (one file, or one file per channel) the way nnU-Net's reader does.

    Returns ``(array, spacing, geometry)``: ``array`` is float32 ``(C, z, y, x)`` -- always four axes, as
    ``SimpleITKIO.read_images`` returns, so it goes straight into :func:`napari_nnseg.predict`; ``spacing``
    is ``(z, y, x)`` in the file's units; ``geometry`` is what :func:`write_labels` needs to put labels on
    the same grid. A 2-D file gives ``z == 1`` and nnU-Net's dummy slice spacing (999 × in-plane).

    Channel files must agree in shape and spacing (nnU-Net refuses them otherwise); a different origin or
    orientation only warns, as in nnU-Net.
    """
    paths = [Path(path_or_paths)] if isinstance(path_or_paths, (str, os.PathLike)) else \
        [Path(p) for p in path_or_paths]
    if not paths:
        raise NnsegError("read_image needs at least one file.")
    parts: list[_OneFile] = []
    for p in paths:
        if not p.is_file():
            raise NnsegError(f"Image file {str(p)!r} does not exist.")
        kind = _kind_of(p)
        parts.append({"nifti": _read_nifti, "tiff": _read_tiff, "npy": _read_npy}[kind](p))
    first = parts[0]
    for p, part in zip(paths[1:], parts[1:]):
        if part.array.shape[1:] != first.array.shape[1:]:
            raise NnsegError(f"Channel files of one image must have the same shape: {paths[0].name} has "
                             f"{first.array.shape[1:]} but {p.name} has {part.array.shape[1:]} (z, y, x).")
        if not np.allclose(part.spacing, first.spacing, rtol=1e-6, atol=0):
            raise NnsegError(f"Channel files of one image must have the same spacing: {paths[0].name} has "
                             f"{first.spacing} but {p.name} has {part.spacing} (z, y, x).")
        if first.affine is not None and part.affine is not None and not np.allclose(part.affine, first.affine):
            warnings.warn(f"{p.name} has another origin/orientation than {paths[0].name}; the labels use "
                          f"{paths[0].name}'s. Check that the channels overlap.", stacklevel=2)
    if len(parts) == 1:
        array = np.asarray(first.array, dtype=np.float32)
    else:
        array = np.concatenate([np.asarray(p.array, dtype=np.float32) for p in parts], axis=0)
    array = np.ascontiguousarray(array)
    geometry = ImageGeometry(
        shape=tuple(int(s) for s in array.shape[1:]), spacing=tuple(first.spacing), file_ndim=first.file_ndim,
        files=tuple(str(p) for p in paths), kind=_kind_of(paths[0]), ending=file_ending(paths[0]),
        affine=first.affine, header=first.header, spacing_source=first.spacing_source, unit=first.unit,
        sidecar=first.sidecar,
    )
    return array, geometry.spacing, geometry  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------


def labels_dtype_for(labels: np.ndarray) -> np.dtype:
    """nnU-Net's rule (``SimpleITKIO.write_seg``): uint8 when the largest label is below 255, else uint16."""
    if labels.size and labels.min() < 0:
        raise NnsegError(f"Labels must be non-negative to be saved; found {labels.min()}.")
    top = int(labels.max()) if labels.size else 0
    if top > np.iinfo(np.uint16).max:
        raise NnsegError(f"Label value {top} does not fit the uint16 label files use.")
    return np.dtype(np.uint8 if top < 255 else np.uint16)


def _spatial_labels(labels: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    labels = np.asarray(labels)
    shape = tuple(geometry.shape)
    if labels.shape != shape and labels.shape == shape[1:] and shape[0] == 1:
        labels = labels[None]
    if labels.shape == (1, *shape):
        labels = labels[0]
    if labels.shape != shape:
        raise NnsegError(f"Labels of shape {labels.shape} do not fit the image they belong to, which has shape "
                         f"{shape} (z, y, x).")
    return labels


def _write_nifti(tmp: Path, labels: np.ndarray, geometry: ImageGeometry, dtype: np.dtype) -> None:
    import nibabel as nib

    data = labels[0] if geometry.file_ndim == 2 else labels
    data = data.astype(dtype, copy=False).T  # (z, y, x) -> NIfTI's (x, y, z)
    header = geometry.header
    if isinstance(header, nib.Nifti1Header):  # Nifti2Header is a subclass
        hdr = header.copy()
        hdr.set_data_dtype(dtype)
        hdr["cal_min"], hdr["cal_max"] = 0, 0  # the image's display window means nothing for labels
        hdr.set_intent("none")
        image_class = nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
        # affine=None keeps the header's own sform/qform bit for bit (no float round trip).
        img = image_class(data, None, header=hdr)
    else:
        img = nib.Nifti1Image(data, geometry.nifti_affine())
        img.set_data_dtype(dtype)
        if geometry.unit in ("mm", "um", "µm", "micron", "m"):
            img.header.set_xyzt_units({"um": "micron", "µm": "micron"}.get(geometry.unit, geometry.unit))
    nib.save(img, str(tmp))


def _write_tiff(tmp: Path, labels: np.ndarray, geometry: ImageGeometry, dtype: np.dtype) -> None:
    import tifffile

    sz, sy, sx = geometry.spacing
    data = labels[0] if geometry.file_ndim == 2 else labels
    metadata: dict[str, Any] = {"axes": "YX" if data.ndim == 2 else "ZYX"}
    if data.ndim == 3:
        metadata["spacing"] = float(sz)
    if geometry.unit:
        metadata["unit"] = "micron" if geometry.unit in ("µm", "um") else geometry.unit
    tifffile.imwrite(str(tmp), data.astype(dtype, copy=False), imagej=True, resolution=(1.0 / sx, 1.0 / sy),
                     metadata=metadata, compression="zlib")


def write_labels(path: str | os.PathLike, labels: np.ndarray, geometry: ImageGeometry) -> Path:
    """Write ``labels`` (``(z, y, x)`` as predicted for an image read by :func:`read_image`) onto its grid.

    The format follows ``path``'s ending. NIfTI keeps the source header and affine (orientation, origin,
    spacing, units), TIFF gets ImageJ spacing metadata (plus a ``.json`` sidecar when the image had one),
    ``.npy`` the bare array. The file is uint8, or uint16 when a label is 255 or more (nnU-Net's rule), and
    appears under its name only once complete.
    """
    path = Path(path)
    kind = _kind_of(path)
    labels = _spatial_labels(labels, geometry)
    dtype = labels_dtype_for(labels)
    with atomic_path(path) as tmp:
        if kind == "nifti":
            _write_nifti(tmp, labels, geometry, dtype)
        elif kind == "tiff":
            _write_tiff(tmp, labels, geometry, dtype)
        else:
            with open(tmp, "wb") as fh:
                np.save(fh, (labels[0] if geometry.file_ndim == 2 else labels).astype(dtype, copy=False))
    if kind != "nifti" and geometry.sidecar:
        side = _sidecar_json(path)
        with atomic_path(side) as tmp:
            tmp.write_text(json.dumps({"spacing": [float(s) for s in geometry.spacing]}), encoding="utf-8")
    return path


def write_image(path: str | os.PathLike, image: np.ndarray, geometry: ImageGeometry) -> Path:
    """Write an intensity image (``(z, y, x)`` or ``(C, z, y, x)``, float32) with ``geometry``, atomically.

    Used to put the demo sample on disk and by tests; a multi-channel NIfTI is written as one 4-D file.
    """
    import nibabel as nib

    path = Path(path)
    if _kind_of(path) != "nifti":
        raise NnsegError(f"write_image writes NIfTI only; {str(path)!r} has another ending.")
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 3 and geometry.file_ndim == 2:
        image = image[0]
    data = image.T if image.ndim <= 3 else image.transpose(3, 2, 1, 0)
    with atomic_path(path) as tmp:
        nib.save(nib.Nifti1Image(data, geometry.nifti_affine()), str(tmp))
    return path
