"""The compute core's entry point: image + model -> labels, as a generator of progress events.

``predict_steps`` yields ``Progress`` events (one per tile, per fold) and returns a ``PredictionResult``;
``predict`` runs it to the end. Front ends (the napari widget, the console helper, the CLI) all drive the
same generator, so they agree with each other and with nnU-Net.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .devices import resolve_device
from .errors import NnsegError
from .export import export, nonlinearity, segmentation_from, uncrop_probabilities
from .fold_ensemble import add_fold, mean_of_folds
from .model import NnUNetModel
from .preprocessing import Preprocessed, preprocess
from .progress import Progress
from .resampling import get_resampler
from .sliding_window import count_tiles, mirror_combinations, sliding_window_logits


@dataclass
class PredictionResult:
    """What a prediction hands back; arrays have the input's spatial shape (or the region's)."""

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    fold_disagreement: np.ndarray | None = None
    class_names: dict[int, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


# Named settings. "nnunet" is the default and gives nnU-Net's labels bit for bit. "batched" keeps nnU-Net's
# algorithm but runs 4 tiles per network call, which is several times faster on CPUs (torch's batch-1
# convolutions are slow there) and changes only the logits' last bits; "fast" also skips test-time
# mirroring (8x fewer forward passes in 3-D). Their agreement with the default is measured in benchmarks/.
PRESETS: dict[str, dict[str, Any]] = {
    "nnunet": {"tile_step_size": 0.5, "use_mirroring": True, "tile_batch_size": 1},
    "batched": {"tile_step_size": 0.5, "use_mirroring": True, "tile_batch_size": 4},
    "fast": {"tile_step_size": 0.5, "use_mirroring": False, "tile_batch_size": 4},
}


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def estimate_cost(model: NnUNetModel, image_shape: Sequence[int], spacing: Sequence[float],
                  tile_step_size: float = 0.5, use_mirroring: bool = True) -> dict[str, int]:
    """Tiles × mirrored passes × folds for an image, without preprocessing it (for the Run button)."""
    spatial = list(image_shape[-3:])
    tf = model.transpose_forward
    shape_t = [spatial[i] for i in tf]
    spacing_t = [float(spacing[i]) for i in tf]
    target = [float(s) for s in model.config["spacing"]]
    if len(target) < 3:
        target = [spacing_t[0], *target]
    new_shape = [int(round(s / t * n)) for s, t, n in zip(spacing_t, target, shape_t)]
    tiles = count_tiles(new_shape, model.patch_size, tile_step_size)
    passes = 1 + (len(mirror_combinations(model.mirror_axes)) if use_mirroring else 0)
    return {"tiles": tiles, "mirror_passes": passes, "folds": len(model.folds),
            "forward_passes": tiles * passes * len(model.folds)}


def predict_steps(
    model: NnUNetModel,
    image: np.ndarray,
    spacing: Sequence[float],
    *,
    device: str | torch.device = "auto",
    tile_step_size: float = 0.5,
    use_mirroring: bool = True,
    perform_everything_on_device: bool = True,
    return_probabilities: bool = False,
    return_uncertainty: bool = False,
    region: tuple[slice, ...] | None = None,
    preset: str | None = None,
    tile_batch_size: int = 1,
) -> Generator[Progress, None, PredictionResult]:
    """Generator form of :func:`predict`: yields ``Progress``, returns the ``PredictionResult``.

    Stopping iteration (``close()``) between events cancels the run; nothing is returned then.
    """
    if preset is not None:
        if preset not in PRESETS:
            raise NnsegError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
        tile_step_size = PRESETS[preset]["tile_step_size"]
        use_mirroring = PRESETS[preset]["use_mirroring"]
        tile_batch_size = PRESETS[preset]["tile_batch_size"]
    if not 0 < tile_step_size <= 1:
        raise NnsegError(f"tile_step_size must be in (0, 1], got {tile_step_size}. nnU-Net uses 0.5; "
                         "larger is faster with less overlap.")
    if int(tile_batch_size) < 1:
        raise NnsegError(f"tile_batch_size must be 1 or more, got {tile_batch_size}.")
    dev = resolve_device(device)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    try:
        yield Progress("preprocess", "preprocessing")
        t0 = time.perf_counter()
        pre = preprocess(model, image, spacing, region=region)
        timings["preprocess"] = time.perf_counter() - t0

        mirror_axes = model.mirror_axes if use_mirroring else None
        n_folds = len(model.folds)
        data = torch.from_numpy(pre.data)
        network = model.network().to(dev)
        fell_back = False
        total = None
        fold_labels: list[np.ndarray] = []
        n_tiles = 0
        t0 = time.perf_counter()
        for k in range(n_folds):
            model.load_fold(network, k)
            on_device = perform_everything_on_device and not fell_back
            while True:
                results_device = dev if on_device else torch.device("cpu")
                try:
                    gen = sliding_window_logits(
                        network, data, model.patch_size, model.labels.num_heads,
                        tile_step_size=tile_step_size, mirror_axes=mirror_axes,
                        device=dev, results_device=results_device, tile_batch_size=tile_batch_size)
                    while True:
                        try:
                            tile, n_tiles = next(gen)
                        except StopIteration as stop:
                            fold_logits = stop.value
                            break
                        yield Progress("predict", f"fold {k + 1}/{n_folds}, tile {tile}/{n_tiles}",
                                       tile=tile, n_tiles=n_tiles, fold=k + 1, n_folds=n_folds,
                                       step=k * n_tiles + tile, n_steps=n_folds * n_tiles,
                                       seconds=time.perf_counter() - started)
                    break
                except RuntimeError as exc:
                    if not (on_device and _is_out_of_memory(exc)):
                        raise
                    warnings.warn(f"Prediction with results on {dev} ran out of memory; continuing with "
                                  "result buffers in CPU memory (slower, same result).", stacklevel=2)
                    _empty_cache(dev)
                    on_device, fell_back = False, True
            fold_logits = fold_logits.to("cpu")
            if return_uncertainty and n_folds > 1:
                fold_labels.append(segmentation_from(model.labels, fold_logits.numpy(), are_probabilities=False))
            total = add_fold(total, fold_logits)
        logits = mean_of_folds(total, n_folds)
        timings["predict"] = time.perf_counter() - t0

        yield Progress("export", "resampling to the image geometry")
        t0 = time.perf_counter()
        labels, probabilities = export(model, logits, pre, return_probabilities=return_probabilities)
        uncertainty = disagreement = None
        if return_uncertainty:
            uncertainty, disagreement = _uncertainty_maps(model, logits, fold_labels, pre)
        timings["export"] = time.perf_counter() - t0
    except NnsegError:
        raise
    except (RuntimeError, FloatingPointError, MemoryError) as exc:
        raise NnsegError(f"Prediction failed on {dev}: {exc}") from exc
    finally:
        if dev.type != "cpu":
            _empty_cache(dev)

    if region is not None:
        labels = labels[region]
        probabilities = probabilities[(slice(None), *region)] if probabilities is not None else None
        uncertainty = uncertainty[region] if uncertainty is not None else None
        disagreement = disagreement[region] if disagreement is not None else None
    seconds = time.perf_counter() - started
    info = {
        "model_folder": str(model.folder), "configuration": model.configuration,
        "folds": list(model.folds), "checkpoint": model.checkpoint, "device": str(dev),
        "tile_step_size": tile_step_size, "use_mirroring": bool(mirror_axes),
        "mirror_axes": list(mirror_axes) if mirror_axes else [],
        "tiles_per_fold": n_tiles, "fell_back_to_cpu": fell_back,
        "preprocessed_shape": list(pre.data.shape[1:]), "seconds": seconds,
        "seconds_per_stage": timings, "preset": preset or "custom",
        "tile_batch_size": tile_batch_size,
    }
    yield Progress("done", f"finished in {seconds:.1f} s", seconds=seconds)
    return PredictionResult(labels=labels, probabilities=probabilities, uncertainty=uncertainty,
                            fold_disagreement=disagreement, class_names=model.class_names, info=info)


def _uncertainty_maps(model: NnUNetModel, logits: torch.Tensor, fold_labels: list[np.ndarray],
                      pre: Preprocessed) -> tuple[np.ndarray, np.ndarray | None]:
    """Normalised entropy of the ensemble's probabilities and the share of folds that disagree with it.

    Both are computed in network space (cheap) and resampled back linearly: they guide a curator's eye and
    are not part of the nnU-Net-identical output.
    """
    probs = nonlinearity(model.labels, logits.numpy()).numpy()
    eps = np.float32(1e-12)
    if model.labels.has_regions:
        p = np.clip(probs, eps, 1 - eps)
        entropy = (-(p * np.log(p) + (1 - p) * np.log(1 - p)) / math.log(2)).mean(0)
    else:
        entropy = -(probs * np.log(np.clip(probs, eps, None))).sum(0) / math.log(max(probs.shape[0], 2))
    maps = [entropy.astype(np.float32)]
    if fold_labels:
        ensemble = segmentation_from(model.labels, probs, are_probabilities=True)
        maps.append(np.mean([f != ensemble for f in fold_labels], axis=0).astype(np.float32))
    stacked = np.stack(maps)
    resample = get_resampler("resample_data_or_seg_to_shape",
                             {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}, "uncertainty")
    back = resample(stacked, pre.shape_after_cropping, pre.target_spacing, pre.original_spacing)
    full = uncrop_probabilities(model, np.clip(back, 0, 1).astype(np.float32), pre, background_outside=False)
    return full[0], (full[1] if fold_labels else None)


def predict(model: NnUNetModel, image: np.ndarray, spacing: Sequence[float], **kwargs) -> PredictionResult:
    """Segment ``image`` with ``model``; the same labels nnU-Net would give.

    Parameters
    ----------
    model
        From :func:`napari_nnseg.load_model`.
    image
        ``(C, z, y, x)``, or ``(z, y, x)`` for one-channel models. Never modified.
    spacing
        Voxel spacing in the image's axis order (e.g. ``(3.0, 0.8, 0.8)`` mm).
    device
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    tile_step_size
        Overlap of the sliding window as a fraction of the patch (nnU-Net default 0.5).
    use_mirroring
        Test-time mirroring over the axes the model was trained with.
    perform_everything_on_device
        Keep result buffers on the GPU (falls back to CPU memory on out-of-memory, with a warning).
    return_probabilities, return_uncertainty
        Also return float32 class probabilities / the fold-ensemble uncertainty maps.
    region
        Slices (in the image's axes) to predict only part of the image, normalised with the whole image.
    preset
        ``"nnunet"`` (nnU-Net's settings, bit-identical labels), ``"batched"`` (4 tiles per network call:
        faster, last-bit differences) or ``"fast"`` (batched, no test-time mirroring); overrides the
        step, mirroring and batch settings.
    tile_batch_size
        Tiles per network call (default 1, as nnU-Net). Larger batches can be faster on a GPU but change the
        logits' last bits, so labels may differ from nnU-Net's at near-ties.
    """
    gen = predict_steps(model, image, spacing, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
