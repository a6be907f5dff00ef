"""The bundled demo model must stay a valid, small, safely loadable nnU-Net v2 results folder, because the
plugin's sample data, docs and many tests rely on it. No training here: these checks run in a second."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_nnseg.demo import demo_model_path, demo_sample, demo_sample_labels

FOLDS = ("fold_0", "fold_1")


def test_demo_folder_has_nnunet_layout():
    folder = demo_model_path()
    assert folder.name == "nnUNetTrainer__nnUNetPlans__3d_fullres"
    assert folder.parent.name == "Dataset001_Demo"
    dataset = json.loads((folder / "dataset.json").read_text())
    plans = json.loads((folder / "plans.json").read_text())
    assert dataset["labels"] == {"background": 0, "sphere": 1, "tube": 2}
    assert len(dataset["channel_names"]) == 1
    conf = plans["configurations"]["3d_fullres"]
    for key in ("patch_size", "spacing", "normalization_schemes", "use_mask_for_norm", "resampling_fn_data",
                "resampling_fn_seg", "resampling_fn_probabilities", "architecture"):
        assert key in conf, key
    assert conf["architecture"]["network_class_name"].endswith("PlainConvUNet")
    assert plans["transpose_forward"] == [0, 1, 2]
    assert "0" in plans["foreground_intensity_properties_per_channel"]
    for fold in FOLDS:
        assert (folder / fold / "checkpoint_final.pth").is_file()


@pytest.mark.parametrize("fold", FOLDS)
def test_demo_checkpoints_load_without_allow_list(fold):
    torch = pytest.importorskip("torch")
    ckpt = torch.load(demo_model_path() / fold / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert ckpt["trainer_name"] == "nnUNetTrainer"
    assert ckpt["init_args"]["configuration"] == "3d_fullres"
    assert tuple(ckpt["inference_allowed_mirroring_axes"]) == (0, 1, 2)
    weights = ckpt["network_weights"]
    assert weights and all(v.dtype == torch.float32 for v in weights.values())
    # the final segmentation head maps to background + 2 classes
    assert weights["decoder.seg_layers.2.weight"].shape[0] == 3


def test_demo_model_is_small():
    folder = demo_model_path().parent
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 5 * 1024**2, f"demo model is {size / 1024**2:.1f} MB"


def test_demo_sample():
    image, spacing = demo_sample()
    labels = demo_sample_labels()
    assert image.dtype == np.float32 and image.ndim == 3
    assert len(spacing) == 3 and all(isinstance(s, float) and s > 0 for s in spacing)
    assert labels.shape == image.shape and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
    # nonzero everywhere, so nnU-Net's crop-to-nonzero keeps the whole volume
    assert image.min() > 0


def test_demo_sample_matches_model_spacing():
    plans = json.loads((demo_model_path() / "plans.json").read_text())
    _, spacing = demo_sample()
    assert list(spacing) == plans["configurations"]["3d_fullres"]["spacing"]
