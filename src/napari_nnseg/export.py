"""From fp16 logits in network space back to labels (and probabilities) in the user's geometry.

As nnU-Net: resample the logits to the cropped original shape with the plans' probability resampler,
softmax/argmax (or sigmoid regions), paste into the uncropped volume, undo the transpose.
"""

from __future__ import annotations

import numpy as np
import torch

from .label_info import LabelInfo
from .preprocessing import Preprocessed
from .resampling import get_resampler


def resample_logits_back(model, logits: np.ndarray, pre: Preprocessed, *, argmax: bool = False) -> np.ndarray:
    """Logits at the cropped original resolution (or, with ``argmax``, just their per-voxel argmax)."""
    resample = get_resampler(model.config["resampling_fn_probabilities"],
                             model.config.get("resampling_fn_probabilities_kwargs"),
                             "plans.json resampling_fn_probabilities", argmax=argmax)
    return resample(logits, pre.shape_after_cropping, pre.target_spacing, pre.original_spacing)


def nonlinearity(labels: LabelInfo, logits: np.ndarray) -> torch.Tensor:
    """float32 softmax over classes, or sigmoid per region."""
    x = torch.from_numpy(np.asarray(logits)).float()
    with torch.no_grad():
        return torch.sigmoid(x) if labels.has_regions else torch.softmax(x, 0)


def segmentation_from(labels: LabelInfo, values: np.ndarray, *, are_probabilities: bool) -> np.ndarray:
    """argmax over channels (ties to the lowest), or regions painted in ``regions_class_order``."""
    if labels.has_regions:
        probs = values if are_probabilities else nonlinearity(labels, values).numpy()
        seg = np.zeros(probs.shape[1:], dtype=np.uint16)
        for i, label_value in enumerate(labels.regions_class_order):
            seg[probs[i] > 0.5] = label_value
        return seg
    return np.asarray(values).argmax(0)


def uncrop_and_untranspose(model, seg_cropped: np.ndarray, pre: Preprocessed) -> np.ndarray:
    full = np.zeros(pre.shape_before_cropping, dtype=model.labels.labels_dtype)
    full[tuple(slice(a, b) for a, b in pre.bbox)] = seg_cropped
    return full.transpose(model.transpose_backward)


def uncrop_probabilities(model, probs: np.ndarray, pre: Preprocessed, *, background_outside: bool = True) -> np.ndarray:
    """Maps back into the full image; outside the nonzero box channel 0 is 1 (background) for label models."""
    full = np.zeros((probs.shape[0], *pre.shape_before_cropping), dtype=np.float32)
    if background_outside and not model.labels.has_regions:
        full[0] = 1  # outside the nonzero box the image is background
    full[(slice(None), *(slice(a, b) for a, b in pre.bbox))] = probs
    return full.transpose([0, *[i + 1 for i in model.transpose_backward]])


def export(model, logits: torch.Tensor | np.ndarray, pre: Preprocessed, *, return_probabilities: bool = False):
    """Labels in the input's geometry (and float32 probabilities when asked)."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().numpy()
    if not return_probabilities and not model.labels.has_regions:
        # labels straight from the resampled fp16 logits, as nnU-Net, without holding every class at full size
        seg = resample_logits_back(model, logits, pre, argmax=True)
        return uncrop_and_untranspose(model, seg, pre), None
    resampled = resample_logits_back(model, logits, pre)
    if not return_probabilities:
        seg = segmentation_from(model.labels, resampled, are_probabilities=False)
        return uncrop_and_untranspose(model, seg, pre), None
    probs = nonlinearity(model.labels, resampled).numpy()
    seg = segmentation_from(model.labels, probs, are_probabilities=True)
    return uncrop_and_untranspose(model, seg, pre), uncrop_probabilities(model, probs, pre)
