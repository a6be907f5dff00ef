"""The inference-tensor check where folds are summed (the bug this project was born from)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from napari_nnseg.fold_ensemble import add_fold, mean_of_folds
from napari_nnseg.sliding_window import sliding_window_logits


def _fold_result(seed: int) -> torch.Tensor:
    """One fold's logits exactly as the predictor makes them: a sliding window under inference mode."""
    torch.manual_seed(seed)
    net = torch.nn.Conv3d(1, 3, 3, padding=1).eval()
    data = torch.randn(1, 12, 20, 20, generator=torch.Generator().manual_seed(0))
    gen = sliding_window_logits(net, data, (8, 16, 16), 3, tile_step_size=0.5, mirror_axes=(0, 1, 2))
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


class _CountClones(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten._to_copy, torch.ops.aten.copy_):
            self.copies += 1
        return func(*args, **(kwargs or {}))


def test_summing_cpu_folds_without_the_check_raises_the_nnunet_error():
    first = _fold_result(0).to("cpu")  # on the CPU .to('cpu') is a no-op: still an inference tensor
    second = _fold_result(1).to("cpu")
    assert first.is_inference()
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        first += second


def test_add_fold_sums_cpu_inference_tensors_in_fp16():
    first, second = _fold_result(0).to("cpu"), _fold_result(1).to("cpu")
    expected = (first.float() + second.float()).half()  # fp16 += fp16 rounds once from fp32
    total = add_fold(add_fold(None, first), second)
    assert not total.is_inference()
    assert torch.equal(total, expected)
    assert first.is_inference() and torch.equal(first, _fold_result(0))  # the fold result was not modified


def test_add_fold_does_not_copy_a_normal_tensor():
    # A GPU result copied to the CPU is a normal tensor; emulate it with a copy made outside inference mode.
    first = _fold_result(0).clone()
    second = _fold_result(1).clone()
    assert not first.is_inference()
    pointer = first.data_ptr()
    with _CountClones() as counter:
        total = add_fold(add_fold(None, first), second)
        total = mean_of_folds(total, 2)
    assert counter.copies == 0
    assert total.data_ptr() == pointer


def test_add_fold_clones_an_inference_accumulator_exactly_once():
    folds = [_fold_result(s).to("cpu") for s in range(3)]
    with _CountClones() as counter:
        total = None
        for f in folds:
            total = add_fold(total, f)
    assert counter.copies == 1
    expected = folds[0].clone()
    expected += folds[1]
    expected += folds[2]
    assert torch.equal(total, expected)


def test_predictor_with_two_folds_on_cpu(tiny_two_fold_model):
    from napari_nnseg import load_model, predict

    model = load_model(tiny_two_fold_model)
    assert model.folds == (0, 1)
    image = np.random.default_rng(0).normal(size=(18, 20, 20)).astype(np.float32)
    result = predict(model, image, (2.0, 0.8, 0.8), device="cpu", use_mirroring=False)
    assert result.labels.shape == image.shape
    assert result.labels.dtype == np.uint8
    assert result.info["folds"] == [0, 1]
