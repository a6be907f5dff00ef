"""The predictor's contract beyond parity: inputs untouched, clear errors, progress, cancel, OOM fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_nnseg import NnsegError, load_model, predict, predict_steps
from napari_nnseg.predictor import estimate_cost

SPACING = (2.0, 0.8, 0.8)


@pytest.fixture(scope="module")
def model(tiny_two_fold_model):
    return load_model(tiny_two_fold_model)


@pytest.fixture(scope="module")
def image():
    from nnunet_reference import make_image

    return make_image((18, 22, 20), 1, seed=3)[0]


def test_input_array_is_never_modified(model, image):
    before = image.copy()
    view = image[:, :, :]  # a view: in-place normalisation of it would show up in `image`
    predict(model, view, SPACING, device="cpu", use_mirroring=False)
    assert np.array_equal(image, before)
    assert image.dtype == before.dtype


def test_progress_counts_every_tile_of_every_fold(model, image):
    events = []
    gen = predict_steps(model, image, SPACING, device="cpu", use_mirroring=False)
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    tiles = [e for e in events if e.stage == "predict"]
    n_tiles = result.info["tiles_per_fold"]
    assert len(tiles) == 2 * n_tiles
    assert [e.step for e in tiles] == list(range(1, 2 * n_tiles + 1))
    assert events[0].stage == "preprocess" and events[-1].stage == "done"
    cost = estimate_cost(model, image.shape, SPACING, 0.5, use_mirroring=True)
    assert cost["tiles"] == n_tiles and cost["mirror_passes"] == 8 and cost["folds"] == 2


def test_closing_the_generator_cancels_between_tiles(model, image):
    gen = predict_steps(model, image, SPACING, device="cpu", use_mirroring=False)
    seen = 0
    for event in gen:
        if event.stage == "predict":
            seen += 1
            if seen == 2:
                gen.close()
                break
    with pytest.raises(StopIteration):
        next(gen)
    assert not torch.is_inference_mode_enabled()  # nothing leaked from the tile work


def test_out_of_memory_on_device_falls_back_with_identical_labels(model, image, monkeypatch):
    import napari_nnseg.sliding_window as sw

    reference = predict(model, image, SPACING, device="cpu", use_mirroring=False, perform_everything_on_device=False)
    real = sw.allocate_buffers
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:  # the first (on-device) attempt fails as a full GPU would
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(sw, "allocate_buffers", flaky)
    with pytest.warns(UserWarning, match="ran out of memory"):
        result = predict(model, image, SPACING, device="cpu", use_mirroring=False,
                         perform_everything_on_device=True)
    assert result.info["fell_back_to_cpu"] is True
    assert calls["n"] == 3  # failed attempt, retry of fold 0, fold 1 straight on CPU buffers
    assert np.array_equal(result.labels, reference.labels)


def test_other_runtime_errors_become_nnseg_errors(model, image, monkeypatch):
    import napari_nnseg.sliding_window as sw

    def broken(*args, **kwargs):
        raise RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")

    monkeypatch.setattr(sw, "allocate_buffers", broken)
    with pytest.raises(NnsegError, match="Prediction failed on cpu: cuDNN error"):
        predict(model, image, SPACING, device="cpu", use_mirroring=False)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"spacing": (2.0, 0.8)}, "spacing has 2 values but the image has 3"),
    ({"spacing": (0.0, 0.8, 0.8)}, "spacing must be positive"),
    ({"tile_step_size": 1.5}, "tile_step_size must be in"),
    ({"device": "cuda:7"}, "cuda"),
    ({"device": "banana"}, "not a torch device"),
])
def test_bad_settings_name_the_problem(model, image, kwargs, message):
    args = {"spacing": SPACING, **kwargs}
    spacing = args.pop("spacing")
    with pytest.raises(NnsegError, match=message):
        predict(model, image, spacing, **args)


def test_wrong_channel_count_is_explained(model, image):
    with pytest.raises(NnsegError, match="expects 1 channel"):
        predict(model, np.stack([image, image]), SPACING, device="cpu")


def test_nan_image_is_refused(model, image):
    bad = image.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(NnsegError, match="NaN"):
        predict(model, bad, SPACING, device="cpu")


def test_uncertainty_maps_are_bounded_and_shaped(model, image):
    result = predict(model, image, SPACING, device="cpu", use_mirroring=False, return_uncertainty=True,
                     return_probabilities=True)
    assert result.uncertainty.shape == image.shape and result.fold_disagreement.shape == image.shape
    assert 0 <= result.uncertainty.min() and result.uncertainty.max() <= 1
    assert set(np.unique(result.fold_disagreement)) <= {0.0, 0.5, 1.0}
    assert np.allclose(result.probabilities.sum(0), 1, atol=1e-5)


def test_region_prediction_uses_whole_image_statistics(model, image):
    from napari_nnseg.preprocessing import preprocess

    full = predict(model, image, SPACING, device="cpu", use_mirroring=False)
    whole = (slice(0, 18), slice(0, 22), slice(0, 20))
    assert np.array_equal(predict(model, image, SPACING, device="cpu", use_mirroring=False,
                                  region=whole).labels, full.labels)
    small = (slice(4, 14), slice(2, 20), slice(3, 17))
    part = predict(model, image, SPACING, device="cpu", use_mirroring=False, region=small)
    assert part.labels.shape == (10, 18, 14)
    # the input spacing equals the model's, so no resampling: the region's network input is exactly the
    # whole image's normalised input cut to the region (not re-normalised with the region's statistics)
    pre_full = preprocess(model, image, SPACING)
    pre_part = preprocess(model, image, SPACING, region=small)
    assert np.array_equal(pre_part.data, pre_full.data[(slice(None), *small)])


def test_tile_batching_changes_only_the_last_bits(model, image):
    one = predict(model, image, SPACING, device="cpu", use_mirroring=False, return_probabilities=True)
    batched = predict(model, image, SPACING, device="cpu", use_mirroring=False, return_probabilities=True,
                      tile_batch_size=3)
    assert batched.info["tile_batch_size"] == 3
    assert np.abs(batched.probabilities - one.probabilities).max() < 1e-2
    assert (batched.labels == one.labels).mean() > 0.99
    with pytest.raises(NnsegError, match="tile_batch_size"):
        predict(model, image, SPACING, device="cpu", tile_batch_size=0)
