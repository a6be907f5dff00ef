"""Summing the folds' logits: where nnU-Net's CPU multi-fold bug lived.

Each fold's logits come out of ``torch.inference_mode()`` as an *inference tensor*. nnU-Net 2.4 summed
them outside inference mode with ``prediction += ...``; on the CPU ``.to('cpu')`` returns the same
inference tensor, so the in-place add raised "Inplace update to inference tensor outside InferenceMode".
Always cloning fixes that but costs a full copy on the GPU path, where ``.to('cpu')`` already made a normal
tensor. So: clone exactly when the accumulator is an inference tensor.
"""

from __future__ import annotations

import torch


def add_fold(total: torch.Tensor | None, fold_logits: torch.Tensor) -> torch.Tensor:
    """Add one fold's fp16 logits to the running sum (fold order is the fp16 summation order)."""
    if total is None:
        return fold_logits
    if total.is_inference():
        total = total.clone()  # outside inference mode a clone is a normal tensor that may be updated
    total += fold_logits
    return total


def mean_of_folds(total: torch.Tensor, n_folds: int) -> torch.Tensor:
    """Divide the fp16 sum by the number of folds, in place, as nnU-Net does (only when > 1)."""
    if n_folds > 1:
        if total.is_inference():
            total = total.clone()
        total /= n_folds
    return total
