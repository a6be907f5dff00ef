"""Loading nnU-Net checkpoints without running code from them.

nnU-Net itself calls ``torch.load(weights_only=False)``, which executes any pickle. We load with
``weights_only=True`` and allow exactly the numpy objects that nnU-Net's training logger puts into a
checkpoint (NNUNET_FACTS.md §1.3); anything else is refused before it can run.
"""

from __future__ import annotations

import _codecs
import pickle
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import NnsegError


def _allowed_globals() -> list:
    allowed: list = [np.dtype, _codecs.encode]
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["scalar"])
        except ImportError:
            continue
        allowed.append(module.scalar)
        break
    for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType"):
        dtype_cls = getattr(getattr(np, "dtypes", None), name, None)
        if dtype_cls is not None:
            allowed.append(dtype_cls)
    return allowed


# torch's safe_globals edits one process-wide allow-list; concurrent loads (widget + console, threaded
# batches) would remove each other's entries mid-load, so loads take turns.
_LOAD_LOCK = threading.Lock()


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict, loaded on the CPU with the restricted unpickler."""
    if not path.is_file():
        raise NnsegError(f"Checkpoint {str(path)!r} does not exist.")
    try:
        with _LOAD_LOCK, torch.serialization.safe_globals(_allowed_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise NnsegError(
            f"Refusing to load {str(path)!r}: it contains objects other than tensors, numbers and the numpy "
            f"types nnU-Net checkpoints hold, and loading them could run code ({str(exc).splitlines()[0]}). "
            "If you trust the file, re-save it keeping only 'network_weights', 'trainer_name', 'init_args' "
            "and 'inference_allowed_mirroring_axes'.") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise NnsegError(f"Could not read checkpoint {str(path)!r}: {exc}. The file may be truncated; "
                         "copy or export it again.") from exc
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise NnsegError(f"{str(path)!r} is not an nnU-Net checkpoint: no 'network_weights' entry.")
    weights = ckpt["network_weights"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise NnsegError(f"{str(path)!r}: 'network_weights' is not a state dict of tensors.")
    return ckpt


def clean_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes some exporters leave."""
    out = {}
    for key, value in weights.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out
