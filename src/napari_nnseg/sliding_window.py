"""Gaussian-weighted sliding-window prediction of one network (one fold), as nnU-Net does it.

Tile positions, the importance map, mirroring order and fp16 accumulation follow NNUNET_FACTS.md §4 so
that, on the CPU, the logits are bit-identical to nnU-Net's. The per-tile work runs under
``torch.inference_mode()``; the loop itself is a generator so a GUI can show progress and stop between
tiles without inference mode leaking into the caller.
"""

from __future__ import annotations

import itertools
from collections.abc import Generator, Sequence
from contextlib import nullcontext
from functools import lru_cache

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

_CPU = torch.device("cpu")


def compute_steps(image_size: Sequence[int], tile_size: Sequence[int], step: float) -> list[list[int]]:
    """Tile start positions per axis: as few tiles as keep the overlap at least ``1 - step``."""
    if not 0 < step <= 1:
        raise ValueError(f"tile_step_size must be in (0, 1], got {step}")
    steps = []
    for size, tile in zip(image_size, tile_size):
        n = int(np.ceil((size - tile) / (tile * step))) + 1
        actual = (size - tile) / (n - 1) if n > 1 else 0.0
        steps.append([int(np.round(actual * i)) for i in range(n)])
    return steps


def tile_slicers(image_shape: Sequence[int], patch_size: Sequence[int], step: float) -> list[tuple]:
    """Slicers in nnU-Net's accumulation order (x, then y, then z; 2-D patches go slice by slice)."""
    slicers = []
    if len(patch_size) == len(image_shape) - 1:
        steps = compute_steps(image_shape[1:], patch_size, step)
        for d in range(image_shape[0]):
            for sx in steps[0]:
                for sy in steps[1]:
                    slicers.append((slice(None), d, slice(sx, sx + patch_size[0]), slice(sy, sy + patch_size[1])))
    else:
        steps = compute_steps(image_shape, patch_size, step)
        for start in itertools.product(*steps):
            slicers.append((slice(None), *(slice(s, s + p) for s, p in zip(start, patch_size))))
    return slicers


@lru_cache(maxsize=2)
def _gaussian_numpy(patch_size: tuple[int, ...]) -> np.ndarray:
    tmp = np.zeros(patch_size)
    tmp[tuple(p // 2 for p in patch_size)] = 1
    g = gaussian_filter(tmp, [p / 8 for p in patch_size], 0, mode="constant", cval=0)
    g /= np.max(g) / 10
    return g


def gaussian_importance(patch_size: Sequence[int], device: torch.device) -> torch.Tensor:
    """fp16 importance map peaking at 10; exact zeros (underflow) become the smallest non-zero value."""
    g = torch.from_numpy(_gaussian_numpy(tuple(int(p) for p in patch_size))).to(device=device,
                                                                               dtype=torch.float16)
    zero = g == 0
    if zero.any():
        g[zero] = torch.min(g[~zero])
    return g


def pad_to_patch(data: torch.Tensor, patch_size: Sequence[int]) -> tuple[torch.Tensor, tuple]:
    """Zero-pad the last axes up to the patch size (odd voxel after) and return the slicer that undoes it."""
    spatial = data.shape[-len(patch_size):]
    pads, revert = [], [slice(None)] * (data.ndim - len(patch_size))
    for size, patch in zip(spatial, patch_size):
        diff = max(0, patch - size)
        below, above = diff // 2, diff - diff // 2
        pads.append((below, above))
        revert.append(slice(below, below + size))
    if not any(b or a for b, a in pads):
        return data, tuple(revert)
    flat = [v for pair in reversed(pads) for v in pair]
    return torch.nn.functional.pad(data, flat, mode="constant", value=0), tuple(revert)


def mirror_combinations(mirror_axes: Sequence[int] | None) -> list[tuple[int, ...]]:
    """Every non-empty subset of the (tensor) axes, in nnU-Net's summation order."""
    if not mirror_axes:
        return []
    axes = [m + 2 for m in mirror_axes]
    return [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


@torch.inference_mode()
def predict_tile(network: torch.nn.Module, x: torch.Tensor, combos: list[tuple[int, ...]]) -> torch.Tensor:
    """Network output for one tile, averaged over the mirrored copies (summed in a fixed order)."""
    pred = network(x)
    for axes in combos:
        pred += torch.flip(network(torch.flip(x, axes)), axes)
    if combos:
        pred /= len(combos) + 1
    return pred


def allocate_buffers(n_heads: int, shape: Sequence[int], results_device: torch.device):
    """The fp16 logit sum and weight sum; on the GPU these dominate memory (2·(C+1)·V bytes)."""
    logits = torch.zeros((n_heads, *shape), dtype=torch.half, device=results_device)
    weights = torch.zeros(tuple(shape), dtype=torch.half, device=results_device)
    return logits, weights


@torch.inference_mode()
def _start(n_heads, shape, patch_size, results_device):
    logits, weights = allocate_buffers(n_heads, shape, results_device)
    return logits, weights, gaussian_importance(patch_size, results_device)


@torch.inference_mode()
def _accumulate(network, data, group, logits, weights, gaussian, combos, device, results_device, autocast):
    """Predict a group of tiles (one network batch) and add them in slicer order."""
    x = torch.stack([data[sl] for sl in group]).contiguous().to(device)
    with autocast:
        preds = predict_tile(network, x, combos).to(results_device)
    for sl, pred in zip(group, preds):
        pred *= gaussian
        logits[sl] += pred
        weights[sl[1:]] += gaussian


@torch.inference_mode()
def _finish(logits, weights, revert):
    torch.div(logits, weights, out=logits)
    if torch.any(torch.isinf(logits)):
        raise FloatingPointError("The prediction overflowed fp16 (inf logits).")
    return logits[(slice(None), *revert[1:])]


def sliding_window_logits(
    network: torch.nn.Module,
    data: torch.Tensor,
    patch_size: Sequence[int],
    n_heads: int,
    *,
    tile_step_size: float = 0.5,
    mirror_axes: Sequence[int] | None = None,
    device: torch.device = _CPU,
    results_device: torch.device = _CPU,
    tile_batch_size: int = 1,
) -> Generator[tuple[int, int], None, torch.Tensor]:
    """Yield ``(tile, n_tiles)`` after each tile; return fp16 logits ``(n_heads, *data.shape[1:])``.

    ``tile_batch_size`` > 1 runs that many tiles per network call (a GPU lever). Batched convolutions
    round differently from batch-1 ones, so logits change in their last bits and labels may differ at
    near-ties; 1 (nnU-Net's way) is the default.

    The returned tensor was made under inference mode (``is_inference()`` is True): callers that update
    it in place outside inference mode must clone it first (see ``fold_ensemble.add_fold``).
    """
    patch_size = tuple(int(p) for p in patch_size)
    padded, revert = pad_to_patch(data, patch_size)
    padded = padded.to(results_device)
    slicers = tile_slicers(padded.shape[1:], patch_size, tile_step_size)
    combos = mirror_combinations(mirror_axes)
    if mirror_axes and max(mirror_axes) > len(patch_size) - 1:
        raise ValueError(f"mirror axes {tuple(mirror_axes)} do not fit a {len(patch_size)}-D patch")
    autocast = torch.autocast("cuda") if device.type == "cuda" else nullcontext()
    logits, weights, gaussian = _start(n_heads, padded.shape[1:], patch_size, results_device)
    if tile_batch_size < 1:
        raise ValueError(f"tile_batch_size must be at least 1, got {tile_batch_size}")
    for start in range(0, len(slicers), tile_batch_size):
        group = slicers[start:start + tile_batch_size]
        _accumulate(network, padded, group, logits, weights, gaussian, combos, device, results_device, autocast)
        yield start + len(group), len(slicers)
    return _finish(logits, weights, revert)


def count_tiles(shape: Sequence[int], patch_size: Sequence[int], step: float) -> int:
    """Tiles for a preprocessed shape, padding included (for cost estimates before running)."""
    padded = list(shape)
    k = len(patch_size)
    padded[-k:] = [max(s, p) for s, p in zip(padded[-k:], patch_size)]
    return len(tile_slicers(padded, patch_size, step))
