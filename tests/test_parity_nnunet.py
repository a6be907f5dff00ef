"""Parity of napari-nnseg's predictions with nnunetv2 2.8.1 on CPU -- the product's correctness contract.

DESIGN.md: "given the same folder, folds, checkpoint, step size and mirroring setting, our labels equal
nnunetv2's nnUNetPredictor labels for the same input". Each case below builds a tiny results folder in
nnU-Net's real format (tests/nnunet_reference.py), runs nnunetv2's own ``predict_single_npy_array`` on it and
then our ``load_model`` + ``predict``, and requires

* identical labels (``np.array_equal``), with the same dtype and the input's spatial shape;
* probabilities of the same shape within 1e-3 (bit-exactness is expected for logits, but nnunetv2's float32
  softmax depends on torch's thread count, NNUNET_FACTS.md §6.4, so probabilities get a tolerance);
* an untouched input array (DESIGN.md "Nothing is lost");
* the same labels again with ``return_probabilities=False`` (the default path, which may export differently).

The cases are chosen so that every branch of nnU-Net's pipeline that changes numbers is crossed at least once:
separate-z vs full-3D cubic resampling and linear export, no resampling at all (input spacing == target),
padding to the patch, 2D configurations on a volume, CT and masked z-score normalisation with a real crop,
region models (sigmoid + regions_class_order), ResidualEncoderUNet, legacy (pre-2.3) plans, a non-identity
``transpose_forward``, 1 and 2 folds and fold auto-detection, mirroring on/off (and a NoMirroring trainer), and
tile steps 0.5 and 0.75. Every reference segmentation must contain at least two labels so a trivially
constant prediction cannot pass.

Model folders are built once per module, on demand, so ``-k`` selections only build what they use.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

pytest.importorskip("nnunetv2")

from nnunet_reference import (  # noqa: E402  (after the importorskip on purpose)
    REGION_CLASS_ORDER,
    REGION_LABELS,
    make_image,
    make_model_folder,
    run_reference,
)

PROB_TOL = 1e-3

# Tiny model folders. Patch sizes are a little smaller than the test images so that there are a few tiles
# (and overlaps, so the Gaussian weighting and fp16 accumulation order matter) but each nnunetv2 run stays
# well under a second or two on 2 cores.
MODELS: dict[str, dict[str, Any]] = {
    # 3d_fullres with target spacing 3.0/0.8/0.8 (ratio > 3): separate-z resampling, [1, 3, 3] kernels
    "aniso": dict(patch_size=(8, 24, 24), spacing=(3.0, 0.8, 0.8), folds=(0, 1), seed=1),
    # isotropic 16^3 patch: test images are thinner than the patch along z, so they get padded
    "iso": dict(patch_size=(16, 16, 16), spacing=(1.0, 1.0, 1.0), folds=(0, 1), seed=2),
    # 2d configuration (slice-wise prediction of a volume), 4-way mirroring
    "2d": dict(dims=2, patch_size=(32, 32), spacing=(0.8, 0.8), folds=(0, 1), seed=3),
    # two channels: CT normalisation (dataset stats, clipping) + z-score restricted to the nonzero mask
    "ct_mask": dict(
        n_channels=2,
        normalization=("CTNormalization", "ZScoreNormalization"),
        use_mask_for_norm=(False, True),
        labels={"background": 0, "liver": 1, "vessel": 2, "lesion": 3},
        patch_size=(16, 16, 16),
        spacing=(2.0, 0.8, 0.8),
        seed=4,
    ),
    # region-based training: sigmoid outputs, labels painted in regions_class_order
    "regions": dict(labels=REGION_LABELS, regions_class_order=REGION_CLASS_ORDER, patch_size=(16, 16, 16),
                    spacing=(1.0, 1.0, 1.0), seed=5),
    # ResEnc U-Net, and plans whose transpose_forward moves the coarse last input axis first
    "resenc": dict(network="ResidualEncoderUNet", patch_size=(16, 16, 16), spacing=(2.0, 1.0, 1.0),
                   transpose_forward=(2, 0, 1), seed=6),
    # pre-2.3 plans without an "architecture" block (NNUNET_FACTS.md §2.2)
    "legacy": dict(legacy_plans=True, patch_size=(16, 16, 16), spacing=(1.0, 1.0, 1.0), seed=7),
    # a trainer variant whose checkpoint stores inference_allowed_mirroring_axes=None: no TTA even if asked
    "no_mirror_trainer": dict(trainer_name="nnUNetTrainerNoMirroring", patch_size=(16, 16, 16),
                              spacing=(1.0, 1.0, 1.0), seed=8),
}


@dataclass(frozen=True)
class Case:
    """One parity comparison: which model, which image, and the predictor settings both sides get."""

    model: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    folds: tuple[int, ...] | None = (0,)
    use_mirroring: bool = True
    step: float = 0.5
    n_channels: int = 1
    image_kw: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    spatial_only: bool = False  # pass a 1-channel image without its channel axis to our API


# Images are sized so that every step-0.75 case gets a different tile grid than step 0.5 would (checked when
# the suite was written: swapping the step, or the mirroring flag, changes hundreds to thousands of labels),
# i.e. the suite would notice a predictor that ignored either setting.
CASES = [
    # --- 3D anisotropic, separate-z in preprocessing (cubic in-plane, nearest z) and export (linear in-plane)
    pytest.param(Case("aniso", (10, 26, 28), (2.5, 0.9, 0.85)), id="aniso-sepz-1fold"),
    pytest.param(Case("aniso", (14, 40, 44), (2.5, 0.9, 0.85), folds=(0, 1), seed=1),
                 id="aniso-sepz-2folds-many-tiles"),
    pytest.param(Case("aniso", (8, 40, 38), (3.0, 0.8, 0.8), folds=(0, 1), use_mirroring=False, step=0.75,
                      seed=2), id="aniso-target-spacing-nomirror-step075"),
    pytest.param(Case("aniso", (7, 45, 42), (3.6, 0.75, 0.8), folds=None, step=0.75, seed=3),
                 id="aniso-zchange-autofolds-step075"),
    # --- 3D isotropic, smaller than the patch along z -> padding (odd difference: the extra voxel goes after);
    # full-3D cubic zoom when spacing differs; 1.25 / 1.0 * 18 = 22.5 checks round-half-to-even (-> 22)
    pytest.param(Case("iso", (11, 20, 18), (1.0, 1.0, 1.0), seed=4), id="iso-pad-odd-target-spacing"),
    pytest.param(Case("iso", (12, 18, 30), (1.1, 1.25, 0.9), folds=(0, 1), use_mirroring=False, step=0.75,
                      seed=5), id="iso-pad-resampled-2folds-nomirror-step075"),
    pytest.param(Case("iso", (12, 20, 18), (1.0, 1.0, 1.0), step=0.75, seed=6, spatial_only=True),
                 id="iso-spatial-only-input"),
    # --- 2D configuration applied slice by slice to a 3D volume (the second one is padded in-plane)
    pytest.param(Case("2d", (5, 60, 56), (2.0, 0.8, 0.8), folds=(0, 1), seed=7), id="2d-target-spacing-2folds"),
    pytest.param(Case("2d", (5, 30, 56), (3.0, 0.7, 0.75), use_mirroring=False, step=0.75, seed=8),
                 id="2d-resampled-pad-nomirror-step075"),
    # --- two channels, CT + masked z-score, zeros outside an ellipsoid -> real crop and mask
    pytest.param(Case("ct_mask", (12, 40, 44), (2.2, 0.8, 0.9), n_channels=2,
                      image_kw=dict(zero_outside=True, ct_channels=(0,)), seed=9), id="ct-maskedz-resampled"),
    pytest.param(Case("ct_mask", (12, 30, 32), (2.0, 0.8, 0.8), n_channels=2, use_mirroring=False, step=0.75,
                      image_kw=dict(zero_outside=True, ct_channels=(0,)), seed=10), id="ct-maskedz-target-spacing"),
    # --- region-based model
    pytest.param(Case("regions", (18, 20, 20), (1.0, 1.0, 1.0), seed=11), id="regions"),
    pytest.param(Case("regions", (22, 20, 28), (1.2, 1.0, 0.9), use_mirroring=False, step=0.75, seed=12),
                 id="regions-resampled-nomirror-step075"),
    # --- ResidualEncoderUNet with transpose_forward (2, 0, 1); spacing is given in the image's own axis order
    pytest.param(Case("resenc", (20, 18, 8), (1.1, 0.95, 2.4), seed=13), id="resenc-transposed-resampled"),
    pytest.param(Case("resenc", (28, 26, 9), (1.0, 1.0, 2.0), use_mirroring=False, step=0.75, seed=14),
                 id="resenc-transposed-target-spacing"),
    # --- legacy plans and a NoMirroring trainer
    pytest.param(Case("legacy", (18, 20, 20), (1.0, 1.0, 1.0), seed=15), id="legacy-plans"),
    pytest.param(Case("no_mirror_trainer", (18, 20, 20), (1.0, 1.0, 1.0), seed=16), id="nomirroring-trainer"),
]


@pytest.fixture(scope="module", autouse=True)
def _torch_threads():
    """Run this module with one torch intra-op thread (override with ``NNSEG_PARITY_TORCH_THREADS``).

    On a 2-core CI box that is also running other jobs, torch's 2-thread kernels on these tiny tensors were
    measured 10-40x slower and erratic (0.3 s vs 5-20 s for the same 2-fold case) because the OpenMP workers
    wait on each other; one thread keeps the suite fast and its timings meaningful. Labels do not depend on
    the thread count (batch-1 network outputs are identical at 1, 2 and 8 threads, NNUNET_FACTS.md §10.4);
    only float32 softmax bits may, which the probability tolerance absorbs.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("NNSEG_PARITY_TORCH_THREADS", "1")))
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Return a function that builds (once per module) and returns the results folder for a MODELS key."""
    built: dict[str, Any] = {}
    root = tmp_path_factory.mktemp("nnunet_models")

    def get(key: str):
        if key not in built:
            built[key] = make_model_folder(root / key, **MODELS[key])
        return built[key]

    return get


@pytest.mark.parametrize("case", CASES)
def test_parity_with_nnunetv2(case: Case, model_dir, record_property):
    """Our labels equal nnunetv2's; probabilities agree to 1e-3; dtype, shape and input are preserved."""
    from napari_nnseg import load_model, predict

    folder = model_dir(case.model)
    image = make_image(case.shape, case.n_channels, seed=case.seed, **case.image_kw)

    t0 = time.perf_counter()
    ref_seg, ref_prob = run_reference(folder, image, case.spacing, case.folds, tile_step_size=case.step,
                                      use_mirroring=case.use_mirroring)
    t_ref = time.perf_counter() - t0
    assert len(np.unique(ref_seg)) >= 2, "reference segmentation is constant; the case would prove nothing"

    model = load_model(folder, folds=case.folds)
    inp = image[0] if case.spatial_only else image
    before = inp.copy()
    t0 = time.perf_counter()
    res = predict(model, inp, case.spacing, device="cpu", tile_step_size=case.step,
                  use_mirroring=case.use_mirroring, perform_everything_on_device=False,
                  return_probabilities=True)
    t_ours = time.perf_counter() - t0
    np.testing.assert_array_equal(inp, before, err_msg="predict modified the caller's image")

    labels = np.asarray(res.labels)
    probs = np.asarray(res.probabilities)
    n_diff = int(np.sum(labels != ref_seg)) if labels.shape == ref_seg.shape else -1
    max_diff = float(np.max(np.abs(probs - ref_prob))) if probs.shape == ref_prob.shape else float("inf")
    record_property("voxels_differ", n_diff)
    record_property("max_prob_diff", max_diff)
    record_property("seconds_ours", round(t_ours, 3))
    record_property("seconds_nnunetv2", round(t_ref, 3))
    print(f"{case.model}: {n_diff} voxels differ of {ref_seg.size}, max |dp| {max_diff:.2e}, "
          f"ours {t_ours:.2f} s, nnunetv2 {t_ref:.2f} s")

    assert labels.shape == image.shape[1:], f"labels shape {labels.shape}, expected {image.shape[1:]}"
    assert labels.dtype == ref_seg.dtype, f"labels dtype {labels.dtype}, nnunetv2 gives {ref_seg.dtype}"
    assert probs.dtype == np.float32, f"probabilities dtype {probs.dtype}"
    assert probs.shape == ref_prob.shape, f"probabilities shape {probs.shape}, nnunetv2 gives {ref_prob.shape}"
    assert np.array_equal(labels, ref_seg), (
        f"{n_diff} of {ref_seg.size} voxels differ from nnunetv2 "
        f"(ours {np.unique(labels).tolist()}, nnunetv2 {np.unique(ref_seg).tolist()})"
    )
    assert max_diff <= PROB_TOL, f"probabilities differ by up to {max_diff:.3g} (> {PROB_TOL})"

    # Labels-only is the default (GUI) path and may take a different export route (e.g. a per-channel argmax
    # without materialising probabilities); nnunetv2's labels are the same with or without probabilities.
    res_labels = predict(model, inp, case.spacing, device="cpu", tile_step_size=case.step,
                         use_mirroring=case.use_mirroring, perform_everything_on_device=False,
                         return_probabilities=False)
    labels_only = np.asarray(res_labels.labels)
    assert labels_only.dtype == ref_seg.dtype and labels_only.shape == ref_seg.shape
    assert np.array_equal(labels_only, ref_seg), (
        f"return_probabilities=False: {int(np.sum(labels_only != ref_seg))} of {ref_seg.size} voxels differ "
        "from nnunetv2"
    )


def test_reference_checkpoints_are_real_format(model_dir):
    """Guard the harness itself: checkpoints must carry what nnUNetTrainer.save_checkpoint writes.

    If they were stripped, the parity suite would silently stop exercising the safe loader on the pickled
    numpy scalars, optimizer state and ``torch.device`` that real checkpoints contain (NNUNET_FACTS.md §1.3).
    """
    import torch

    ckpt = torch.load(model_dir("aniso") / "fold_1" / "checkpoint_final.pth", map_location="cpu",
                      weights_only=False)
    assert {"network_weights", "optimizer_state", "grad_scaler_state", "logging", "_best_ema", "current_epoch",
            "init_args", "trainer_name", "inference_allowed_mirroring_axes"} <= set(ckpt)
    assert ckpt["trainer_name"] == "nnUNetTrainer"
    assert ckpt["init_args"]["configuration"] == "3d_fullres"
    assert isinstance(ckpt["init_args"]["device"], torch.device)
    assert tuple(ckpt["inference_allowed_mirroring_axes"]) == (0, 1, 2)
    assert isinstance(ckpt["_best_ema"], np.floating)
    with pytest.raises(Exception, match="numpy"):
        torch.load(model_dir("aniso") / "fold_1" / "checkpoint_final.pth", map_location="cpu",
                   weights_only=True)
