"""The bundled demo model and sample volume.

They let a new user (and the test suite) see a real nnU-Net v2 prediction without downloading anything:
the model is a tiny network trained by ``scripts/train_demo_model.py`` on synthetic volumes (bright
"sphere" ellipsoids, darker "tube" capsules), and the sample is a held-out volume from the same generator
with its ground truth. This module imports neither torch nor napari, so listing the plugin stays cheap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_PACKAGE = Path(__file__).resolve().parent
_RESULTS_FOLDER = _PACKAGE / "demo_model" / "Dataset001_Demo" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
_SAMPLE = _PACKAGE / "demo_data" / "sample.npz"


def demo_model_path() -> Path:
    """The demo's nnU-Net results folder, usable wherever a user's own results folder is.

    It is the ``Trainer__Plans__configuration`` folder itself (not the dataset folder above it), so it
    names exactly one configuration and ``nnUNetPredictor`` accepts it unchanged.
    """
    return _RESULTS_FOLDER


def _load_sample() -> dict[str, np.ndarray]:
    # allow_pickle=False: the file ships inside the package, but an .npz never needs pickles.
    with np.load(_SAMPLE, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def demo_sample() -> tuple[np.ndarray, tuple[float, ...]]:
    """The sample image as the model expects it: float32 ``(z, y, x)`` and its spacing in mm.

    The file stores integer intensities as uint16 to stay small; casting back to float32 is exact, so the
    image equals the one the model was evaluated on. The spacing matches the model's target spacing.
    """
    data = _load_sample()
    image = data["image"].astype(np.float32)
    spacing = tuple(float(s) for s in data["spacing"])
    return image, spacing


def demo_sample_labels() -> np.ndarray:
    """Ground truth for :func:`demo_sample` (0 background, 1 sphere, 2 tube), to judge a prediction."""
    return _load_sample()["labels"].astype(np.uint8)
