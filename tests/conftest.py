"""Shared fixtures: tiny but real nnU-Net results folders, built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# nnunetv2 pulls in triton (through torch._dynamo); importing triton after Mesa has created an OpenGL context
# crashes the process, so the reference is imported before any napari viewer exists.
import nnunetv2.inference.predict_from_raw_data  # noqa: E402, F401


@pytest.fixture(scope="session")
def tiny_two_fold_model(tmp_path_factory) -> Path:
    from nnunet_reference import make_model_folder

    return make_model_folder(tmp_path_factory.mktemp("tiny2"), folds=(0, 1), patch_size=(16, 16, 16),
                             spacing=(2.0, 0.8, 0.8), features=(2, 4, 8))
