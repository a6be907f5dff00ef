"""A trained nnU-Net v2 model, read safely from its results folder and ready to predict."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import clean_state_dict, load_checkpoint
from .errors import NnsegError
from .fast_norm import use_fast_instance_norm
from .label_info import LabelInfo
from .model_folder import detect_folds, find_results_folder, fold_folder_name
from .network_table import build_network
from .plans import intensity_properties, resolve_configuration

_REFUSED_TRAINER_MARKERS = {
    "Primus": "Primus trainers replace the plans' U-Net with a transformer that napari-nnseg does not build",
}


@dataclass
class NnUNetModel:
    """Everything inference needs from a results folder, with every fold's weights in memory.

    Holding the weights (not the files) lets a folder of images run with one load, and lets the GUI show
    what was found before anything runs.
    """

    folder: Path
    configuration: str
    checkpoint: str
    folds: tuple[int | str, ...]
    dataset_json: dict[str, Any]
    plans: dict[str, Any]
    config: dict[str, Any]
    labels: LabelInfo
    trainer_name: str
    mirror_axes: tuple[int, ...] | None
    fold_weights: list[dict[str, torch.Tensor]] = field(repr=False)
    use_batchnorm: bool = False
    _network: torch.nn.Module | None = field(default=None, repr=False)

    # ---- what the plans say -------------------------------------------------------------------------
    @property
    def channel_names(self) -> list[str]:
        names = self.dataset_json.get("channel_names", self.dataset_json.get("modality", {}))
        return [str(names[k]) for k in sorted(names, key=lambda k: int(k))]

    @property
    def num_input_channels(self) -> int:
        return len(self.channel_names)

    @property
    def dataset_name(self) -> str:
        return str(self.plans.get("dataset_name") or self.dataset_json.get("name") or self.folder.parent.name)

    @property
    def class_names(self) -> dict[int, str]:
        return dict(self.labels.names)

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.config["patch_size"])

    @property
    def is_2d(self) -> bool:
        return len(self.patch_size) == 2

    @property
    def transpose_forward(self) -> tuple[int, ...]:
        return tuple(self.plans.get("transpose_forward", [0, 1, 2]))

    @property
    def transpose_backward(self) -> tuple[int, ...]:
        return tuple(self.plans.get("transpose_backward", [0, 1, 2]))

    @property
    def target_spacing(self) -> tuple[float, ...]:
        """The configuration's spacing in the image's own axis order (plans store it transposed)."""
        spacing = [float(s) for s in self.config["spacing"]]
        if len(spacing) != len(self.transpose_forward):
            return tuple(spacing)
        out = [0.0] * len(spacing)
        for transposed_axis, original_axis in enumerate(self.transpose_forward):
            out[original_axis] = spacing[transposed_axis]
        return tuple(out)

    @property
    def intensity_properties(self) -> list[dict | None]:
        return intensity_properties(self.plans, self.num_input_channels)

    def summary(self) -> str:
        """A few lines a person reads before pressing Run."""
        classes = ", ".join(f"{v}: {n}" for v, n in self.class_names.items() if v != 0)
        return "\n".join([
            f"dataset: {self.dataset_name}",
            f"configuration: {self.configuration} ({'2D' if self.is_2d else '3D'}), trainer {self.trainer_name}",
            f"folds: {', '.join(str(f) for f in self.folds)} ({self.checkpoint})",
            f"input channels: {', '.join(self.channel_names)}",
            f"classes: {classes}" + (" (region-based)" if self.labels.has_regions else ""),
            f"patch size: {'x'.join(str(p) for p in self.patch_size)}, "
            f"spacing: {', '.join(f'{s:g}' for s in self.target_spacing)}",
            f"mirroring axes: {self.mirror_axes if self.mirror_axes is not None else 'none'}",
        ])

    # ---- the network ----------------------------------------------------------------------------------
    def network(self) -> torch.nn.Module:
        """The plans' network (built once, re-used for every fold and case)."""
        if self._network is None:
            self._network = build_network(self.config["architecture"], self.num_input_channels,
                                          self.labels.num_heads, use_batchnorm=self.use_batchnorm,
                                          where=str(self.folder / "plans.json"))
            use_fast_instance_norm(self._network)  # bit-identical, faster at batch 1
            self._network.eval()
        return self._network

    def load_fold(self, network: torch.nn.Module, index: int) -> None:
        try:
            network.load_state_dict(self.fold_weights[index], strict=True)
        except RuntimeError as exc:
            fold = fold_folder_name(self.folds[index])
            raise NnsegError(
                f"The weights in {fold}/{self.checkpoint} do not fit the network that plans.json describes "
                f"(trainer {self.trainer_name!r} may change the architecture): {str(exc).splitlines()[0]}"
            ) from exc


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError as exc:
        raise NnsegError(f"{str(path)!r} is missing from the model folder.") from exc
    except json.JSONDecodeError as exc:
        raise NnsegError(f"{str(path)!r} is not valid JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise NnsegError(f"{str(path)!r} should hold a JSON object.")
    return data


def load_model(path: str | os.PathLike, configuration: str | None = None,
               folds: Sequence[int | str] | int | str | None = None,
               checkpoint: str = "checkpoint_final.pth") -> NnUNetModel:
    """Read a trained nnU-Net v2 model.

    Parameters
    ----------
    path
        A results folder (``Trainer__Plans__configuration``), a folder holding several of them, or the zip
        written by ``nnUNetv2_export_model_to_zip``.
    configuration
        Which configuration to use when ``path`` holds several (``"3d_fullres"`` or the full folder name).
    folds
        Fold numbers (``0``, ``(0, 1)``) or ``"all"``; ``None`` detects them as nnU-Net does.
    checkpoint
        ``checkpoint_final.pth`` (default) or ``checkpoint_best.pth``.

    Checkpoints load with ``weights_only=True``; network classes come from a fixed allow-list; no trainer
    class is imported.
    """
    folder = find_results_folder(path, configuration)
    dataset_json = _read_json(folder / "dataset.json")
    plans = _read_json(folder / "plans.json")
    if folds is None:
        fold_list = detect_folds(folder, checkpoint)
    else:
        fold_list = [folds] if isinstance(folds, (int, str)) else list(folds)
        fold_list = [f if str(f) == "all" else int(f) for f in fold_list]
        if not fold_list:
            raise NnsegError("folds is empty; pass at least one fold, or None to use every trained fold.")
    checkpoints = []
    for fold in fold_list:
        ckpt_path = folder / fold_folder_name(fold) / checkpoint
        if not ckpt_path.is_file():
            available = detect_folds(folder, checkpoint) if any(folder.glob(f"fold_*/{checkpoint}")) else []
            raise NnsegError(f"Fold {fold} has no {checkpoint} in {str(folder)!r}. "
                             f"Folds with that checkpoint: {available or 'none'}.")
        checkpoints.append(load_checkpoint(ckpt_path))

    first = checkpoints[0]
    trainer_name = str(first.get("trainer_name") or folder.name.split("__")[0])
    for marker, why in _REFUSED_TRAINER_MARKERS.items():
        if marker in trainer_name:
            raise NnsegError(f"Trainer {trainer_name!r} is not supported: {why}.")
    init_args = first.get("init_args") or {}
    config_name = init_args.get("configuration") if isinstance(init_args, dict) else None
    if config_name is None:
        parts = folder.name.split("__")
        config_name = parts[-1] if len(parts) == 3 else configuration
    if config_name is None:
        raise NnsegError(f"Cannot tell the configuration of {str(folder)!r}: the checkpoint has no "
                         "init_args['configuration'] and the folder is not named Trainer__Plans__config.")
    config = resolve_configuration(plans, str(config_name), str(folder / "plans.json"))
    if config.get("previous_stage"):
        raise NnsegError(f"Configuration {config_name!r} is a cascade stage (previous_stage "
                         f"{config['previous_stage']!r}); cascades are not supported yet. Use the "
                         "3d_lowres or 3d_fullres configuration instead.")
    mirror = first.get("inference_allowed_mirroring_axes")
    mirror_axes = tuple(int(a) for a in mirror) if mirror is not None else None

    weights = [clean_state_dict(c["network_weights"]) for c in checkpoints]
    has_running_stats = any(k.endswith("norm.running_mean") for k in weights[0])
    use_batchnorm = trainer_name.startswith("nnUNetTrainerBN") or has_running_stats

    model = NnUNetModel(
        folder=folder, configuration=str(config_name), checkpoint=checkpoint, folds=tuple(fold_list),
        dataset_json=dataset_json, plans=plans, config=config,
        labels=LabelInfo.from_dataset_json(dataset_json, str(folder / "dataset.json")),
        trainer_name=trainer_name, mirror_axes=mirror_axes, fold_weights=weights, use_batchnorm=use_batchnorm,
    )
    if model.num_input_channels == 0:
        raise NnsegError(f"{str(folder / 'dataset.json')!r} lists no channel_names.")
    network = model.network()
    for i in range(len(weights)):
        model.load_fold(network, i)
    return model
