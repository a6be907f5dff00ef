"""nnU-Net's resampling functions, selected by the name the plans give.

The default (``resample_data_or_seg_to_shape``) is scikit-image's spline resize in float64 with nnU-Net's
"separate-z" rule for anisotropic data; the ``*_torch*`` variants are torch ``interpolate``. Which one a
model uses is part of what it was trained with, so the plans decide, from this fixed table only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from skimage.transform import resize

from .errors import NnsegError

ANISO_THRESHOLD = 3


def compute_new_shape(old_shape: Sequence[int], old_spacing: Sequence[float],
                      new_spacing: Sequence[float]) -> tuple[int, ...]:
    """Python ``round`` (half to even) of ``old_spacing / new_spacing * old_shape``, in that order."""
    return tuple(int(round(i / j * k)) for i, j, k in zip(old_spacing, new_spacing, old_shape))


def _lowres_axes(spacing: Sequence[float]) -> np.ndarray:
    spacing = np.asarray(spacing, dtype=float)
    return np.where(max(spacing) / spacing == 1)[0]


def separate_z_axis(force_separate_z: bool | None, current_spacing: Sequence[float],
                    new_spacing: Sequence[float], threshold: float = ANISO_THRESHOLD) -> int | None:
    """The one low-resolution axis to treat separately, or None for full 3-D interpolation."""
    def aniso(s):
        return np.max(s) / np.min(s) > threshold

    if force_separate_z is not None:
        axes = _lowres_axes(current_spacing) if force_separate_z else None
    elif aniso(current_spacing):
        axes = _lowres_axes(current_spacing)
    elif aniso(new_spacing):
        axes = _lowres_axes(new_spacing)
    else:
        axes = None
    if axes is None or len(axes) != 1:
        return None
    return int(axes[0])


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index per output index for nearest interpolation with half-pixel centres."""
    coords = float(n_in) / n_out * (np.arange(n_out) + 0.5) - 0.5
    return np.clip(np.floor(coords + 0.5), 0, n_in - 1).astype(np.intp)


def resample_spline(data: np.ndarray, new_shape: Sequence[int], current_spacing: Sequence[float],
                    new_spacing: Sequence[float], *, is_seg: bool = False, order: int = 3, order_z: int = 0,
                    force_separate_z: bool | None = False,
                    separate_z_anisotropy_threshold: float = ANISO_THRESHOLD) -> np.ndarray:
    """nnU-Net's default: float64 spline resize per channel, in-plane then nearest along a coarse axis."""
    if is_seg:
        raise NnsegError("Resampling segmentations is only needed for cascades, which are not supported.")
    if order_z != 0:
        raise NnsegError(f"resampling kwargs: order_z={order_z} is not supported (nnU-Net's default is 0).")
    new_shape = tuple(int(s) for s in new_shape)
    shape = data.shape[1:]
    if shape == new_shape:
        return data
    axis = separate_z_axis(force_separate_z, current_spacing, new_spacing, separate_z_anisotropy_threshold)
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    kwargs = {"mode": "edge", "anti_aliasing": False}
    for c in range(data.shape[0]):
        channel = data[c].astype(np.float64)
        if axis is None:
            out[c] = resize(channel, new_shape, order, **kwargs)
            continue
        plane_shape = tuple(s for i, s in enumerate(new_shape) if i != axis)
        tmp_shape = list(new_shape)
        tmp_shape[axis] = shape[axis]
        tmp = np.zeros(tmp_shape)
        for k in range(shape[axis]):
            index = [slice(None)] * 3
            index[axis] = k
            tmp[tuple(index)] = resize(channel[tuple(index)], plane_shape, order, **kwargs)
        if shape[axis] != new_shape[axis]:
            tmp = np.take(tmp, _nearest_indices(shape[axis], new_shape[axis]), axis=axis)
        out[c] = tmp
    return out


def _torch_interpolate(data: torch.Tensor, new_shape: Sequence[int], mode: str) -> torch.Tensor:
    if mode == "linear":
        mode = "trilinear" if data.ndim == 4 else "bilinear"
    return torch.nn.functional.interpolate(data[None].float(), tuple(new_shape), mode=mode, antialias=False)[0]


def resample_torch(data: np.ndarray, new_shape: Sequence[int], current_spacing: Sequence[float],
                   new_spacing: Sequence[float], *, is_seg: bool = False, num_threads: int = 4,
                   device: str = "cpu", memefficient_seg_resampling: bool = False,
                   force_separate_z: bool | None = None,
                   separate_z_anisotropy_threshold: float = ANISO_THRESHOLD, mode: str = "linear",
                   aniso_axis_mode: str = "nearest-exact", separate: bool = True) -> np.ndarray:
    """nnU-Net's ``resample_torch_fornnunet`` (``separate=False``: ``resample_torch_simple``), in float32."""
    if is_seg:
        raise NnsegError("Resampling segmentations is only needed for cascades, which are not supported.")
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(data.shape[1:]) == new_shape:
        return data
    x = torch.from_numpy(np.ascontiguousarray(data))
    axis = separate_z_axis(force_separate_z, current_spacing, new_spacing,
                           separate_z_anisotropy_threshold) if separate else None
    with torch.no_grad():
        if axis is None:
            y = _torch_interpolate(x, new_shape, mode)
        else:
            others = [i for i in range(3) if i != axis]
            moved = x.movedim(axis + 1, 1)  # (c, a, o1, o2)
            c, n_a = moved.shape[:2]
            planes = moved.reshape(c * n_a, *moved.shape[2:])
            planes = _torch_interpolate(planes, [new_shape[i] for i in others], mode)
            stacked = planes.reshape(c, n_a, *planes.shape[1:]).movedim(1, axis + 1)
            y = _torch_interpolate(stacked, new_shape, aniso_axis_mode)
    return y.numpy()  # float32, as nnU-Net's torch resampling returns it


def no_resampling(data: np.ndarray, new_shape: Sequence[int], current_spacing: Sequence[float],
                  new_spacing: Sequence[float], **_: object) -> np.ndarray:
    return data


_RESAMPLERS: dict[str, tuple[Callable, set[str]]] = {
    "resample_data_or_seg_to_shape": (resample_spline, {"is_seg", "order", "order_z", "force_separate_z",
                                                        "separate_z_anisotropy_threshold"}),
    "resample_torch_fornnunet": (resample_torch, {"is_seg", "num_threads", "device",
                                                  "memefficient_seg_resampling", "force_separate_z",
                                                  "separate_z_anisotropy_threshold", "mode",
                                                  "aniso_axis_mode"}),
    "resample_torch_simple": (lambda *a, **k: resample_torch(*a, separate=False, **k),
                              {"is_seg", "num_threads", "device", "memefficient_seg_resampling", "mode"}),
    "no_resampling_data_or_seg_to_shape": (no_resampling, {"is_seg", "order", "order_z", "force_separate_z"}),
}


def get_resampler(name: str, kwargs: dict | None, where: str) -> Callable[..., np.ndarray]:
    """A function ``(data, new_shape, current_spacing, new_spacing) -> data`` for the plans' name/kwargs."""
    if name not in _RESAMPLERS:
        raise NnsegError(f"{where}: resampling function {name!r} is not supported; supported: "
                         f"{', '.join(_RESAMPLERS)}.")
    fn, allowed = _RESAMPLERS[name]
    kwargs = dict(kwargs or {})
    unknown = set(kwargs) - allowed
    if unknown:
        raise NnsegError(f"{where}: unknown kwargs {sorted(unknown)} for {name}.")
    kwargs.pop("device", None)  # the plans' device is the training machine's; resample on the CPU
    kwargs.pop("num_threads", None)

    def run(data, new_shape, current_spacing, new_spacing):
        return fn(data, new_shape, current_spacing, new_spacing, **kwargs)

    return run
