"""Test-only nnU-Net v2 reference harness: tiny model folders plus nnunetv2's own predictor.

Why this exists: the product contract (DESIGN.md) is that our labels equal nnunetv2 2.8.1's labels for the
same folder, folds, checkpoint, step size and mirroring setting. Real trained models are far too large for a
2-core CI machine, so this module builds *tiny* results folders that are nevertheless in nnU-Net's real
on-disk format (NNUNET_FACTS.md §1, §10): the checkpoint is written by ``nnUNetTrainer.save_checkpoint``
itself, so it carries the optimizer state, the numpy-scalar training log and the ``torch.device`` in
``init_args`` that a safe loader must cope with. The reference prediction is nnunetv2's in-process
``predict_single_npy_array`` on CPU, which is bit-identical to its CLI (§10.2).

nnunetv2 is imported lazily inside the functions so that importing this module (e.g. during test collection)
stays cheap and does not require nnunetv2 unless a reference is actually built or run.

Script use (for the parity note)::

    python tests/nnunet_reference.py            # builds a few folders in a temp dir, prints agreement/timing
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_LABELS = {"background": 0, "organ": 1, "tumor": 2}
REGION_LABELS = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
REGION_CLASS_ORDER = (1, 2, 3)

# The data_augmentation trainer variants only change training; their mirror axes are what matter at inference.
_TRAINER_SENTINEL = "trainer"

_ARCH_CLASSES = {
    "PlainConvUNet": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "ResidualEncoderUNet": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
}
_LEGACY_ARCH_CLASSES = {"PlainConvUNet", "ResidualEncoderUNet"}


# ----------------------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _nnunet_env(results: Path, preprocessed: Path) -> Iterator[None]:
    """Point nnU-Net's path variables at temp dirs for the duration of a build, then restore them.

    nnUNetTrainer derives its output folder from ``nnUNet_results`` (read lazily by ``nnunetv2.paths``), so
    setting it to ``root`` makes the trainer create the canonical ``Dataset/Trainer__Plans__config/fold_N``
    layout itself. Restoring the previous values keeps tests independent of each other and of the user's
    shell.
    """
    saved = {k: os.environ.get(k) for k in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw")}
    os.environ["nnUNet_results"] = str(results)
    os.environ["nnUNet_preprocessed"] = str(preprocessed)
    os.environ.setdefault("nnUNet_raw", str(preprocessed))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------------------------------------
# plans
# ----------------------------------------------------------------------------------------------------------


def _default_topology(
    patch_size: Sequence[int], spacing: Sequence[float], n_stages: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Strides and kernel sizes in the spirit of nnU-Net's planner, small enough for a tiny net.

    Like ``get_pool_and_conv_props``, an axis whose spacing is more than twice the finest one is not pooled
    and gets a kernel of 1 until the in-plane resolution has caught up; this exercises the anisotropic
    ``[1, 3, 3]`` kernels real 3d_fullres plans contain. Every stride is checked against the patch.
    """
    dim = len(patch_size)
    cur_spacing = list(map(float, spacing))
    cur_size = list(map(int, patch_size))
    strides = [[1] * dim]
    kernels = []
    for stage in range(n_stages):
        finest = min(cur_spacing)
        kernels.append([3 if s <= 2 * finest else 1 for s in cur_spacing])
        if stage == n_stages - 1:
            break
        stride = [2 if (s <= 2 * finest and n % 2 == 0 and n >= 8) else 1 for s, n in zip(cur_spacing, cur_size)]
        strides.append(stride)
        cur_spacing = [s * k for s, k in zip(cur_spacing, stride)]
        cur_size = [n // k for n, k in zip(cur_size, stride)]
    return strides, kernels


def _intensity_properties(n_channels: int, overrides: Mapping[str, Mapping[str, float]] | None) -> dict:
    """``foreground_intensity_properties_per_channel`` with CT-like stats that actually clip.

    CTNormalization ignores the image and uses these dataset statistics, so they are chosen to lie inside the
    range of :func:`make_image`'s CT-like channel: the percentile clip and the shift/scale then all matter.
    """
    props = {}
    for c in range(n_channels):
        props[str(c)] = {
            "max": 900.0,
            "mean": 60.5,
            "median": 55.0,
            "min": -400.0,
            "percentile_00_5": -90.0,
            "percentile_99_5": 310.25,
            "std": 95.3,
        }
    if overrides:
        for k, v in overrides.items():
            props[str(k)] = dict(v)
    return props


def make_plans(
    *,
    dims: int = 3,
    n_channels: int = 1,
    normalization: Sequence[str] = ("ZScoreNormalization",),
    use_mask_for_norm: Sequence[bool] = (False,),
    network: str = "PlainConvUNet",
    patch_size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    features: Sequence[int] = (4, 8, 16),
    strides: Sequence[Sequence[int]] | None = None,
    kernel_sizes: Sequence[Sequence[int]] | None = None,
    configuration: str | None = None,
    dataset_name: str = "Dataset999_Toy",
    plans_name: str = "nnUNetPlans",
    transpose_forward: Sequence[int] | None = None,
    intensity_properties: Mapping[str, Mapping[str, float]] | None = None,
    legacy_plans: bool = False,
    resampling_overrides: Mapping[str, Any] | None = None,
) -> tuple[dict, str]:
    """Hand-written ``plans.json`` content with one configuration, as nnU-Net's planners would write it.

    Returns ``(plans, configuration_name)``. Keys that inference does not read (batch_size, data_identifier,
    median sizes) are included anyway because the trainer constructor reads some of them and because a
    realistic file is the better test of our reader. With ``legacy_plans`` the configuration carries the
    pre-2.3 keys (``UNet_class_name``, ``pool_op_kernel_sizes`` ...) instead of an ``architecture`` block,
    which nnunetv2 converts at load time (NNUNET_FACTS.md §2.2).
    """
    if dims not in (2, 3):
        raise ValueError("dims must be 2 or 3")
    if patch_size is None:
        patch_size = [16, 16, 16] if dims == 3 else [32, 32]
    if spacing is None:
        spacing = [1.0] * dims
    patch_size = [int(p) for p in patch_size]
    spacing = [float(s) for s in spacing]
    if len(patch_size) != dims or len(spacing) != dims:
        raise ValueError("patch_size and spacing need one entry per configuration dimension")
    if len(normalization) != n_channels or len(use_mask_for_norm) != n_channels:
        raise ValueError("normalization and use_mask_for_norm need one entry per channel")
    configuration = configuration or ("3d_fullres" if dims == 3 else "2d")
    n_stages = len(features)
    if strides is None or kernel_sizes is None:
        d_strides, d_kernels = _default_topology(patch_size, spacing, n_stages)
        strides = strides if strides is not None else d_strides
        kernel_sizes = kernel_sizes if kernel_sizes is not None else d_kernels
    strides = [list(map(int, s)) for s in strides]
    kernel_sizes = [list(map(int, k)) for k in kernel_sizes]
    total = np.prod(np.array(strides), axis=0)
    if any(p % int(t) for p, t in zip(patch_size, total)):
        raise ValueError(f"patch {patch_size} is not divisible by the total stride {total.tolist()}")

    tf = list(transpose_forward) if transpose_forward is not None else list(range(3))
    tb = [int(i) for i in np.argsort(tf)]

    conv = f"torch.nn.modules.conv.Conv{dims}d"
    norm = f"torch.nn.modules.instancenorm.InstanceNorm{dims}d"
    blocks_key = "n_conv_per_stage" if network == "PlainConvUNet" else "n_blocks_per_stage"
    if network == "PlainConvUNet":
        per_stage = [2] * n_stages
    elif network == "ResidualEncoderUNet":
        per_stage = [1] + [2] * (n_stages - 1)
    else:
        raise ValueError(f"unknown network {network!r}")

    resampling = {
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {
            "is_seg": False,
            "order": 1,
            "order_z": 0,
            "force_separate_z": None,
        },
    }
    if resampling_overrides:
        resampling.update(copy.deepcopy(dict(resampling_overrides)))

    cfg: dict[str, Any] = {
        "data_identifier": f"{plans_name}_{configuration}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": patch_size,
        "median_image_size_in_voxels": [int(p * 1.5) for p in patch_size],
        "spacing": spacing,
        "normalization_schemes": list(normalization),
        "use_mask_for_norm": [bool(b) for b in use_mask_for_norm],
        **resampling,
        "batch_dice": dims == 3,
    }
    if legacy_plans:
        if network not in _LEGACY_ARCH_CLASSES:
            raise ValueError("legacy plans only know PlainConvUNet and ResidualEncoderUNet")
        base = int(features[0])
        if any(int(f) != base * 2**i for i, f in enumerate(features)):
            raise ValueError("legacy plans need features base * 2**i")
        cfg.update(
            {
                "UNet_class_name": network,
                "UNet_base_num_features": base,
                "unet_max_num_features": int(features[-1]),
                "n_conv_per_stage_encoder": per_stage,
                "n_conv_per_stage_decoder": [2] * (n_stages - 1),
                "num_pool_per_axis": [int(np.log2(t)) for t in total],
                "pool_op_kernel_sizes": strides,
                "conv_kernel_sizes": kernel_sizes,
            }
        )
    else:
        cfg["architecture"] = {
            "network_class_name": _ARCH_CLASSES[network],
            "arch_kwargs": {
                "n_stages": n_stages,
                "features_per_stage": [int(f) for f in features],
                "conv_op": conv,
                "kernel_sizes": kernel_sizes,
                "strides": strides,
                blocks_key: per_stage,
                "n_conv_per_stage_decoder": [2] * (n_stages - 1) if network == "PlainConvUNet" else [1] * (
                    n_stages - 1
                ),
                "conv_bias": True,
                "norm_op": norm,
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        }

    full_spacing = spacing if dims == 3 else [spacing[0] * 2.5, *spacing]
    plans = {
        "dataset_name": dataset_name,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": full_spacing,
        "original_median_shape_after_transp": [40, 48, 48],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": tf,
        "transpose_backward": tb,
        "configurations": {configuration: cfg},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": _intensity_properties(n_channels, intensity_properties),
    }
    return plans, configuration


def make_dataset_json(n_channels: int, labels: Mapping[str, Any], regions_class_order=None) -> dict:
    """``dataset.json`` as nnUNetv2 raw datasets carry it (only labels and the channel count matter)."""
    names = ["CT", "T2", "ADC", "FLAIR"]
    ds = {
        "channel_names": {str(c): names[c % len(names)] for c in range(n_channels)},
        "labels": {k: (list(v) if isinstance(v, (list, tuple)) else int(v)) for k, v in labels.items()},
        "numTraining": 10,
        "file_ending": ".nii.gz",
    }
    if regions_class_order is not None:
        ds["regions_class_order"] = [int(i) for i in regions_class_order]
    return ds


# ----------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------


def _perturb_weights(network, seed: int, logit_scale: float = 3.0) -> None:
    """Make an untrained network produce decisive, image-dependent, multi-class outputs.

    He-initialised weights with zero biases and unit InstanceNorm affines give logits whose channels differ
    little, so argmax would be dominated by noise or by one class. Randomising the norm affines and the
    biases (seeded generator, so each fold differs reproducibly) and scaling the final 1x1 segmentation
    layer spreads the classes; a random bias on that layer shifts the class balance so that several labels
    appear. Aliased state-dict keys (``convs.N.conv`` vs ``convs.N.all_modules.0``) share storage, so
    iterating over ``named_parameters`` touches every tensor exactly once.
    """
    import torch

    g = torch.Generator().manual_seed(int(seed))
    seg_prefix = _last_seg_layer_prefix(network)
    with torch.no_grad():
        for name, p in network.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name.startswith(seg_prefix):
                if name.endswith("weight"):
                    p.mul_(logit_scale).add_(0.5 * noise)
                else:
                    p.copy_(0.6 * noise)
            elif p.ndim == 1 and name.endswith("weight"):  # norm scale
                p.copy_(1.0 + 0.3 * noise)
            elif p.ndim == 1:  # conv / norm bias
                p.copy_(0.2 * noise)
            else:  # conv kernels: keep He scale, add a relative perturbation
                p.mul_(1.0 + 0.2 * noise)


def _balance_classes(network, patch_size: Sequence[int], n_channels: int, seed: int) -> None:
    """Re-centre the segmentation-head bias so every output channel wins somewhere.

    LeakyReLU features have a positive mean, so random head weights give each class a different mean logit
    and one class tends to win almost everywhere. Running the net once on a standardised calibration image of
    patch size and subtracting each channel's mean logit (plus a small seeded offset) leaves all classes
    competitive (and, for region models, sigmoid > 0.5 about half the time), which makes the parity test
    sensitive to every channel.
    """
    import torch

    calib = make_image(patch_size, n_channels, seed=10_000 + seed)
    calib = (calib - calib.mean(axis=tuple(range(1, calib.ndim)), keepdims=True)) / calib.std(
        axis=tuple(range(1, calib.ndim)), keepdims=True
    )
    was_training = network.training
    network.eval()
    with torch.no_grad():
        out = network(torch.from_numpy(calib.astype(np.float32))[None])
        out = out[0] if isinstance(out, (list, tuple)) else out
        mean = out[0].flatten(1).mean(1)
        g = torch.Generator().manual_seed(int(seed) + 7)
        bias = dict(network.named_parameters())[_last_seg_layer_prefix(network) + "bias"]
        bias.sub_(mean).add_(0.3 * torch.randn(bias.shape, generator=g))
    network.train(was_training)


def _last_seg_layer_prefix(network) -> str:
    """Name prefix of the segmentation head that is used when deep supervision is off."""
    n = len(network.decoder.seg_layers)
    return f"decoder.seg_layers.{n - 1}."


# ----------------------------------------------------------------------------------------------------------
# the model folder
# ----------------------------------------------------------------------------------------------------------


def make_model_folder(
    root: str | os.PathLike,
    *,
    dims: int = 3,
    n_channels: int = 1,
    normalization: Sequence[str] = ("ZScoreNormalization",),
    use_mask_for_norm: Sequence[bool] = (False,),
    labels: Mapping[str, Any] | None = None,
    regions_class_order: Sequence[int] | None = None,
    network: str = "PlainConvUNet",
    patch_size: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    features: Sequence[int] = (4, 8, 16),
    strides: Sequence[Sequence[int]] | None = None,
    kernel_sizes: Sequence[Sequence[int]] | None = None,
    folds: Sequence[int | str] = (0,),
    mirror_axes: Any = _TRAINER_SENTINEL,
    trainer_name: str = "nnUNetTrainer",
    seed: int = 0,
    legacy_plans: bool = False,
    configuration: str | None = None,
    dataset_name: str = "Dataset999_Toy",
    plans_name: str = "nnUNetPlans",
    transpose_forward: Sequence[int] | None = None,
    intensity_properties: Mapping[str, Mapping[str, float]] | None = None,
    checkpoint_name: str = "checkpoint_final.pth",
    logit_scale: float = 3.0,
    resampling_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Build a tiny but real nnU-Net v2 results folder under ``root`` and return its config folder.

    The returned path is ``root/<dataset_name>/<trainer>__<plans>__<configuration>`` with ``dataset.json``,
    ``plans.json`` and ``fold_N/<checkpoint_name>`` for every fold, i.e. what ``nnUNetv2_train`` leaves
    behind (minus validation outputs). The procedure is NNUNET_FACTS.md §10.1: an actual trainer instance
    (``plans['continue_training'] = False`` because ``run_training.py`` normally injects it) builds the
    network from the plans, the weights are perturbed with a seeded generator (``seed + 1000 * fold_index``),
    the optimizer and mirror axes are configured as in training, one fake epoch is logged with numpy scalars
    and ``save_checkpoint`` writes the file -- so the checkpoint has every key and pickled type a real one has.

    ``mirror_axes``: ``"trainer"`` keeps what the trainer class sets ((0, 1, 2) for 3D, (0, 1) for 2D, None
    for NoMirroring variants); a tuple or None overrides ``inference_allowed_mirroring_axes`` explicitly.
    ``trainer_name`` must be an nnunetv2 trainer class (nnunetv2 re-imports it by name at inference).
    """
    import torch
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    root = Path(root)
    labels = dict(labels if labels is not None else DEFAULT_LABELS)
    plans, configuration = make_plans(
        dims=dims,
        n_channels=n_channels,
        normalization=normalization,
        use_mask_for_norm=use_mask_for_norm,
        network=network,
        patch_size=patch_size,
        spacing=spacing,
        features=features,
        strides=strides,
        kernel_sizes=kernel_sizes,
        configuration=configuration,
        dataset_name=dataset_name,
        plans_name=plans_name,
        transpose_forward=transpose_forward,
        intensity_properties=intensity_properties,
        legacy_plans=legacy_plans,
        resampling_overrides=resampling_overrides,
    )
    dataset_json = make_dataset_json(n_channels, labels, regions_class_order)
    trainer_class = recursive_find_trainer_class_by_name(trainer_name)
    if trainer_class is None:
        raise ValueError(f"nnunetv2 has no trainer class {trainer_name!r}")

    out_dir = root / dataset_name / f"{trainer_name}__{plans_name}__{configuration}"
    out_dir.mkdir(parents=True, exist_ok=True)
    # Written before training, like on_train_start does; JSON from the *unconverted* plans (legacy stays legacy).
    (out_dir / "plans.json").write_text(json.dumps(plans, indent=4))
    (out_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=4))

    preprocessed = root / "_nnUNet_preprocessed"
    preprocessed.mkdir(exist_ok=True)
    with _nnunet_env(root, preprocessed), _quiet():
        for i, fold in enumerate(folds):
            p = copy.deepcopy(plans)
            p["continue_training"] = False
            trainer = trainer_class(p, configuration, fold if fold == "all" else int(fold), copy.deepcopy(dataset_json),
                                    device=torch.device("cpu"))
            if Path(trainer.output_folder).parent != out_dir:
                raise RuntimeError(f"trainer wrote to {trainer.output_folder}, expected below {out_dir}")
            # Fork the global RNG: the network constructor's He init draws from it and must be reproducible
            # without changing the RNG state seen by the tests.
            with torch.random.fork_rng():
                torch.manual_seed(int(seed) + 1000 * i)
                trainer.num_input_channels = n_channels
                trainer.network = trainer.build_network_architecture(
                    trainer.plans_manager,
                    trainer.configuration_manager,
                    n_channels,
                    trainer.label_manager.num_segmentation_heads,
                    trainer.enable_deep_supervision,
                ).to(trainer.device)
            _perturb_weights(trainer.network, int(seed) + 1000 * i, logit_scale=logit_scale)
            _balance_classes(trainer.network, plans["configurations"][configuration]["patch_size"], n_channels,
                             int(seed) + 1000 * i)
            trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
            trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            if mirror_axes != _TRAINER_SENTINEL:
                trainer.inference_allowed_mirroring_axes = (
                    None if mirror_axes is None else tuple(int(a) for a in mirror_axes)
                )
            _log_fake_epoch(trainer, rng=np.random.default_rng(int(seed) + i))
            trainer.save_checkpoint(str(Path(trainer.output_folder) / checkpoint_name))
            for f in Path(trainer.output_folder).glob("training_log_*.txt"):
                f.unlink()  # timestamped; keeps the folder deterministic between builds
    return out_dir


def _log_fake_epoch(trainer, rng: np.random.Generator) -> None:
    """Log one epoch the way ``nnUNetTrainer`` does, so ``logging`` holds numpy scalars like a real checkpoint.

    Those numpy objects (np.float64 dice values, np.float32 losses, ``_best_ema``) are exactly what makes a
    real checkpoint fail ``torch.load(weights_only=True)`` without an allow-list (NNUNET_FACTS.md §1.3).
    """
    ep = trainer.current_epoch
    n_fg = len(trainer.label_manager.foreground_regions if trainer.label_manager.has_regions
               else trainer.label_manager.foreground_labels)
    t0 = time.time()
    trainer.logger.log("epoch_start_timestamps", t0, ep)
    trainer.logger.log("lrs", trainer.optimizer.param_groups[0]["lr"], ep)
    trainer.logger.log("train_losses", np.float32(-0.1 - rng.random()), ep)
    trainer.logger.log("val_losses", np.float64(-0.1 - rng.random()), ep)
    dice = [np.float64(rng.random()) for _ in range(n_fg)]
    trainer.logger.log("mean_fg_dice", np.float64(np.nanmean(dice)), ep)
    trainer.logger.log("dice_per_class_or_region", dice, ep)
    trainer.logger.log("epoch_end_timestamps", t0 + 1.0, ep)
    trainer._best_ema = trainer.logger.get_value("ema_fg_dice", step=-1)
    trainer.current_epoch += 1


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence nnU-Net's chatty prints (device, log lines) while building folders."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


# ----------------------------------------------------------------------------------------------------------
# test images
# ----------------------------------------------------------------------------------------------------------


def make_image(
    shape: Sequence[int],
    n_channels: int = 1,
    *,
    seed: int = 0,
    zero_outside: bool = False,
    ct_channels: Sequence[int] = (),
    sigma: float = 1.5,
    n_blobs: int = 4,
) -> np.ndarray:
    """A seeded, smooth-ish float32 volume ``(C, *shape)`` that gives a tiny random net varied outputs.

    Gaussian-filtered noise provides texture at the scale of the conv receptive field and a few bright
    blobs give large coherent structures, so the segmentation is neither constant nor pure noise.
    ``zero_outside`` zeroes every channel outside an off-centre ellipsoid, like a skull-stripped MRI: nnU-Net
    then crops to the bounding box and masked normalisations use only the inside, so the crop/mask code
    paths matter. ``ct_channels`` are rescaled to a Hounsfield-like range that CTNormalization clips.
    """
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    chans = []
    for c in range(n_channels):
        img = ndi.gaussian_filter(rng.standard_normal(shape), sigma=sigma)
        img /= img.std() + 1e-12
        for _ in range(n_blobs):
            centre = rng.uniform(-0.7, 0.7, size=len(shape))
            radius = rng.uniform(0.15, 0.4)
            d2 = sum((g - m) ** 2 for g, m in zip(grids, centre)) / radius**2
            img += rng.uniform(1.5, 3.0) * np.exp(-d2)
        if c in ct_channels:
            img = img * 120.0 + 40.0  # roughly -400 .. 700 "HU"
        else:
            img = img * 50.0 + 200.0
        chans.append(img)
    out = np.stack(chans).astype(np.float32)
    if zero_outside:
        centre = rng.uniform(-0.15, 0.15, size=len(shape))
        d2 = sum((g - m) ** 2 / 0.8**2 for g, m in zip(grids, centre))
        out[:, d2 > 1.0] = 0.0
    return out


# ----------------------------------------------------------------------------------------------------------
# the reference prediction
# ----------------------------------------------------------------------------------------------------------


def reference_predictor(
    model_dir: str | os.PathLike,
    folds: Sequence[int | str] | None = (0,),
    *,
    tile_step_size: float = 0.5,
    use_mirroring: bool = True,
    checkpoint_name: str = "checkpoint_final.pth",
):
    """An initialised ``nnUNetPredictor`` on CPU, configured exactly as the parity contract states."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with _quiet():
        pred = nnUNetPredictor(
            tile_step_size=tile_step_size,
            use_gaussian=True,
            use_mirroring=use_mirroring,
            perform_everything_on_device=False,
            device=torch.device("cpu"),
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        pred.initialize_from_trained_model_folder(
            str(model_dir), use_folds=None if folds is None else tuple(folds), checkpoint_name=checkpoint_name
        )
    return pred


def run_reference(
    model_dir: str | os.PathLike,
    image: np.ndarray,
    spacing: Sequence[float],
    folds: Sequence[int | str] | None = (0,),
    *,
    tile_step_size: float = 0.5,
    use_mirroring: bool = True,
    checkpoint_name: str = "checkpoint_final.pth",
    predictor=None,
) -> tuple[np.ndarray, np.ndarray]:
    """nnunetv2's own ``predict_single_npy_array`` result ``(seg, probabilities)`` for one image.

    ``image`` is ``(C, *spatial)``; a spatial-only array is treated as one channel. nnunetv2 needs 4-D input
    ``(C, z, y, x)``. A copy of the image and a fresh properties dict are passed because nnunetv2 mutates the
    dict (crop and shape keys) and we must not let the reference touch the caller's arrays. torch's thread
    count is restored afterwards: nnunetv2's export sets it to 8, which would otherwise leak into the timing
    and the float32 softmax bits of whatever runs next.
    """
    import torch

    img = np.array(image, dtype=np.float32, copy=True)
    if img.ndim == len(spacing):
        img = img[None]
    if img.ndim != 4:
        raise ValueError(f"nnunetv2 wants (C, z, y, x); got shape {image.shape}")
    pred = predictor or reference_predictor(
        model_dir, folds, tile_step_size=tile_step_size, use_mirroring=use_mirroring,
        checkpoint_name=checkpoint_name,
    )
    threads = torch.get_num_threads()
    try:
        with _quiet():
            seg, probs = pred.predict_single_npy_array(
                img, {"spacing": [float(s) for s in spacing]}, None, None, True
            )
    finally:
        torch.set_num_threads(threads)
    return np.asarray(seg), np.asarray(probs)


# ----------------------------------------------------------------------------------------------------------
# script-friendly comparison
# ----------------------------------------------------------------------------------------------------------


def compare(
    model_dir: str | os.PathLike,
    image: np.ndarray,
    spacing: Sequence[float],
    folds: Sequence[int | str] | None = (0,),
    *,
    tile_step_size: float = 0.5,
    use_mirroring: bool = True,
    checkpoint_name: str = "checkpoint_final.pth",
    verbose: bool = True,
    torch_threads: int | None = None,
    name: str | None = None,
) -> dict:
    """Run ours and nnunetv2 on one case; return agreement and wall-clock figures.

    Each side is timed from a loaded model to the returned arrays (model loading excluded on both sides, so
    the figure compares prediction cost). Keys: ``voxel_agreement`` (fraction of equal labels),
    ``n_voxels_differ``, ``max_prob_diff``, ``seconds_ours``, ``seconds_ref``, ``labels_ref`` (distinct
    reference labels). ``torch_threads`` pins torch's intra-op thread count for both sides (restored after),
    so that the two timings are taken under the same conditions. ``name`` labels the printed line.
    """
    import torch

    from napari_nnseg import load_model, predict

    threads = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(int(torch_threads))
    try:
        return _compare(model_dir, image, spacing, folds, tile_step_size=tile_step_size,
                        use_mirroring=use_mirroring, checkpoint_name=checkpoint_name, verbose=verbose,
                        load_model=load_model, predict=predict, name=name)
    finally:
        torch.set_num_threads(threads)


def _compare(model_dir, image, spacing, folds, *, tile_step_size, use_mirroring, checkpoint_name, verbose,
             load_model, predict, name) -> dict:
    """Body of :func:`compare` (split out so the thread count is restored on every exit path)."""
    pred = reference_predictor(
        model_dir, folds, tile_step_size=tile_step_size, use_mirroring=use_mirroring,
        checkpoint_name=checkpoint_name,
    )
    t0 = time.perf_counter()
    seg_ref, prob_ref = run_reference(model_dir, image, spacing, folds, predictor=pred)
    t_ref = time.perf_counter() - t0

    model = load_model(model_dir, folds=None if folds is None else tuple(folds), checkpoint=checkpoint_name)
    t0 = time.perf_counter()
    res = predict(
        model, np.array(image, copy=True), spacing, device="cpu", tile_step_size=tile_step_size,
        use_mirroring=use_mirroring, perform_everything_on_device=False, return_probabilities=True,
    )
    t_ours = time.perf_counter() - t0
    labels = np.asarray(res.labels)
    probs = np.asarray(res.probabilities)
    same_shape = labels.shape == seg_ref.shape
    out = {
        "voxel_agreement": float(np.mean(labels == seg_ref)) if same_shape else 0.0,
        "n_voxels_differ": int(np.sum(labels != seg_ref)) if same_shape else int(seg_ref.size),
        "max_prob_diff": float(np.max(np.abs(probs - prob_ref))) if probs.shape == prob_ref.shape else float("inf"),
        "seconds_ours": t_ours,
        "seconds_ref": t_ref,
        "labels_ref": [int(v) for v in np.unique(seg_ref)],
    }
    if verbose:
        print(
            f"{name or Path(model_dir).parent.parent.name}: agreement {out['voxel_agreement']:.6f} "
            f"({out['n_voxels_differ']} voxels differ), max |dp| {out['max_prob_diff']:.2e}, "
            f"ours {t_ours:.2f} s, nnunetv2 {t_ref:.2f} s"
        )
    return out


def _main(argv: Sequence[str] | None = None) -> None:
    """Build a few folders in a temp dir and print per-case agreement and timing (for the parity note).

    ``--large`` adds the NNUNET_FACTS.md §10 toy case (2 channels CT + masked z-score, patch 24x32x32,
    features 4/8/16, image 2x30x70x64, 2 folds, 8-way mirroring), whose run time is dominated by the forward
    passes like a real model's, so the ours/nnunetv2 timing ratio means something there.
    """
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads for both sides")
    ap.add_argument("--large", action="store_true", help="also run the NNUNET_FACTS.md section 10 toy case")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        aniso = make_model_folder(tmp / "a", patch_size=(8, 24, 24), spacing=(3.0, 0.8, 0.8), folds=(0, 1), seed=1)
        iso = make_model_folder(tmp / "b", patch_size=(16, 16, 16), spacing=(1.0, 1.0, 1.0), seed=2)
        cases = [
            ("aniso-sepz-2folds", aniso, make_image((10, 26, 28), seed=1), (2.5, 0.9, 0.85), (0, 1)),
            ("iso-pad-1fold", iso, make_image((12, 20, 18), seed=2), (1.0, 1.0, 1.0), (0,)),
        ]
        if args.large:
            toy = make_model_folder(
                tmp / "c", n_channels=2, normalization=("CTNormalization", "ZScoreNormalization"),
                use_mask_for_norm=(False, True), patch_size=(24, 32, 32), spacing=(2.0, 0.8, 0.8),
                features=(4, 8, 16), folds=(0, 1), seed=3,
            )
            img = make_image((30, 70, 64), 2, seed=3, zero_outside=True, ct_channels=(0,))
            cases.append(("facts10-toy-2folds", toy, img, (2.5, 0.9, 0.7), (0, 1)))
        for name, model_dir, img, sp, folds in cases:
            compare(model_dir, img, sp, folds, torch_threads=args.threads, name=name)


if __name__ == "__main__":
    _main()
