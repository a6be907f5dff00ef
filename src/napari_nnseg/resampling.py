"""nnU-Net's resampling functions, selected by the name the plans give.

The default (``resample_data_or_seg_to_shape``) is scikit-image's spline resize in float64 with nnU-Net's
"separate-z" rule for anisotropic data; the ``*_torch*`` variants are torch ``interpolate``. Which one a
model uses is part of what it was trained with, so the plans decide, from this fixed table only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from skimage.transform import resize

from .errors import NnsegError

ANISO_THRESHOLD = 3

# Channels are resized in parallel threads (scipy releases the GIL), one float64 channel at a time instead
# of nnU-Net's float64 copy of every channel; the arithmetic per channel is scikit-image's, unchanged.
RESAMPLING_THREADS = max(1, min(8, os.cpu_count() or 1))


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


def resize_channel(channel: np.ndarray, new_shape: Sequence[int], order: int,
                   axis: int | None) -> np.ndarray:
    """Resize one channel to ``new_shape`` as nnU-Net does, returning float64.

    ``axis`` (separate-z) resizes each slice along it in-plane with ``order``, then takes the nearest slice
    (an index lookup, where nnU-Net builds a full coordinate grid for ``map_coordinates(order=0)``).
    """
    new_shape = tuple(int(s) for s in new_shape)
    kwargs = {"mode": "edge", "anti_aliasing": False}
    if axis is None:
        return resize(channel.astype(np.float64), new_shape, order, **kwargs)
    shape = channel.shape
    plane_shape = tuple(s for i, s in enumerate(new_shape) if i != axis)
    tmp_shape = list(new_shape)
    tmp_shape[axis] = shape[axis]
    tmp = np.zeros(tmp_shape)
    for k in range(shape[axis]):
        index = [slice(None)] * channel.ndim
        index[axis] = k
        tmp[tuple(index)] = resize(channel[tuple(index)].astype(np.float64), plane_shape, order, **kwargs)
    if shape[axis] != new_shape[axis]:
        tmp = np.take(tmp, _nearest_indices(shape[axis], new_shape[axis]), axis=axis)
    return tmp


def _map_channels(fn, n_channels: int):
    """Yield ``fn(c)`` for every channel in order, computing up to RESAMPLING_THREADS at a time."""
    if RESAMPLING_THREADS <= 1 or n_channels <= 1:
        for c in range(n_channels):
            yield fn(c)
        return
    with ThreadPoolExecutor(RESAMPLING_THREADS) as pool:
        pending = [pool.submit(fn, c) for c in range(min(n_channels, RESAMPLING_THREADS))]
        for c in range(n_channels):
            result = pending[c].result()
            pending[c] = None  # release as soon as consumed: memory stays bounded by the threads in flight
            if c + RESAMPLING_THREADS < n_channels:
                pending.append(pool.submit(fn, c + RESAMPLING_THREADS))
            yield result


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
    channels = _map_channels(lambda c: resize_channel(data[c], new_shape, order, axis), data.shape[0])
    for c, resized in enumerate(channels):
        out[c] = resized  # numpy casts float64 -> the input dtype once, as nnU-Net's assignment does
    return out


def resample_spline_argmax(data: np.ndarray, new_shape: Sequence[int], current_spacing: Sequence[float],
                           new_spacing: Sequence[float], *, order: int = 1, force_separate_z: bool | None = False,
                           separate_z_anisotropy_threshold: float = ANISO_THRESHOLD, **_: object) -> np.ndarray:
    """``resample_spline(...).argmax(0)`` one channel at a time.

    Holds one resampled channel, the running maximum and the index instead of every class at the output
    resolution; ties keep the lower channel as ``argmax`` does, and values are compared after the same cast
    to the logits' dtype, so the labels are those of the full array.
    """
    new_shape = tuple(int(s) for s in new_shape)
    if data.shape[1:] == new_shape:
        return data.argmax(0)
    axis = separate_z_axis(force_separate_z, current_spacing, new_spacing, separate_z_anisotropy_threshold)
    index = np.zeros(new_shape, dtype=np.uint8 if data.shape[0] <= 256 else np.uint16)
    best = None
    channels = _map_channels(lambda c: resize_channel(data[c], new_shape, order, axis).astype(data.dtype),
                             data.shape[0])
    for c, value in enumerate(channels):
        if best is None:
            best = value
            continue
        better = value > best
        np.copyto(best, value, where=better)
        index[better] = c
    return index


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


def get_resampler(name: str, kwargs: dict | None, where: str, *, argmax: bool = False) -> Callable[..., np.ndarray]:
    """A function ``(data, new_shape, current_spacing, new_spacing) -> data`` for the plans' name/kwargs.

    With ``argmax=True`` the function returns the channel argmax of the resampled data instead, computed
    channel by channel where the resampler allows it (memory: one channel, not all classes).
    """
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

    if argmax and fn is resample_spline and not kwargs.get("is_seg") and not kwargs.get("order_z"):
        def run_argmax(data, new_shape, current_spacing, new_spacing):
            return resample_spline_argmax(data, new_shape, current_spacing, new_spacing, **kwargs)

        return run_argmax

    def run(data, new_shape, current_spacing, new_spacing):
        out = fn(data, new_shape, current_spacing, new_spacing, **kwargs)
        return np.asarray(out).argmax(0) if argmax else out

    return run
