"""Train the small demo nnU-Net v2 model that ships with napari-nnseg, and write its sample volume.

The plugin needs a real trained model to demonstrate (and to test) itself without asking users to download
anything, and that model has to be tiny, licence-free and reproducible. So this script synthesises 3D
volumes whose labels are known by construction, trains a miniature nnU-Net-style ``PlainConvUNet`` on them
with plain torch (nnU-Net's own trainer needs a preprocessed dataset on disk and hours of epochs), and writes
the result as a genuine nnU-Net v2 results folder that ``nnUNetPredictor`` loads unchanged. The held-out
evaluation runs through nnunetv2 itself, so the reported Dice is what an nnU-Net user would get.

Training reproduces nnU-Net's inference preprocessing exactly: the target spacing equals the synthetic
spacing (no resampling), the background is never zero (no cropping), and every case is z-scored over the
whole volume in float32, as ``ZScoreNormalization`` with ``use_mask_for_norm=False`` does.

Re-run (about 10 minutes on an idle 2-core CPU, much longer when the cores are shared)::

    /work/venv/bin/python scripts/train_demo_model.py --out src/napari_nnseg/demo_model
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from scipy import ndimage
from torch import nn

from napari_nnseg.network_table import resolve_op

ROOT = Path(__file__).resolve().parents[1]
DATASET = "Dataset001_Demo"
RESULTS_SUBFOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"
SPACING = (2.0, 0.8, 0.8)  # (z, y, x) mm; anisotropic like CT, but below nnU-Net's separate-z threshold
SHAPE = (40, 96, 96)
PATCH_SIZE = [24, 64, 64]
BATCH_SIZE = 2
LABELS = {"background": 0, "sphere": 1, "tube": 2}
N_TRAIN_CASES = 20
# Seeds for the sample and the held-out cases are far from the training seeds so no volume is reused.
TRAIN_SEED, HELDOUT_SEED, SAMPLE_SEED = 1000, 5000, 4242

ARCH_KWARGS = {
    "n_stages": 4,
    "features_per_stage": [8, 16, 32, 64],
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 4,
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": [2, 2, 2, 2],
    "n_conv_per_stage_decoder": [2, 2, 2],
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}


# --------------------------------------------------------------------------------------------- synthesis


def _capsule_distance(points: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Distance to a line segment: tubes are capsules so their ends are round, not cut."""
    d = p1 - p0
    t = np.clip(((points - p0) @ d) / float(d @ d), 0.0, 1.0)
    return np.linalg.norm(points - (p0 + t[..., None] * d), axis=-1)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], amplitude: float) -> np.ndarray:
    """Slow intensity drift (like coil shading or uneven illumination) so absolute thresholds fail."""
    coarse = rng.normal(size=tuple(max(2, s // 8) for s in shape))
    field = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=3, mode="nearest")
    field = ndimage.gaussian_filter(field, sigma=[s / 8 for s in shape])
    field /= max(np.abs(field).max(), 1e-6)
    return amplitude * field


def make_case(seed: int, shape: tuple[int, int, int] = SHAPE,
              spacing: tuple[float, float, float] = SPACING) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic volume and its labels, fully determined by ``seed``.

    Bright ellipsoids (label 1) and darker capsule-shaped tubes (label 2) sit on a noisy, slowly varying
    background. Sizes are set in millimetres so the anisotropic spacing matters as it does in real scans.
    Intensities are integers (stored as uint16 in the sample file) and never zero, so nnU-Net's
    crop-to-nonzero keeps the whole volume.
    """
    rng = np.random.default_rng(seed)
    spacing_arr = np.asarray(spacing)
    extent = np.asarray(shape) * spacing_arr
    grid = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij"),
                    axis=-1)
    labels = np.zeros(shape, np.uint8)
    contrast = np.zeros(shape, np.float64)

    # Tubes first, so spheres drawn later win where the two overlap (one label per voxel).
    for _ in range(rng.integers(2, 5)):
        radius = rng.uniform(3.0, 5.0)
        direction = rng.normal(size=3)
        direction[0] *= 0.5  # mostly in-plane, as vessels across a few thick slices
        direction /= np.linalg.norm(direction)
        length = rng.uniform(35.0, 70.0)
        centre = rng.uniform(0.2, 0.8, size=3) * extent
        p0, p1 = centre - direction * length / 2, centre + direction * length / 2
        inside = _capsule_distance(grid, p0, p1) <= radius
        labels[inside] = 2
        contrast[inside] = -rng.uniform(60.0, 80.0)

    for _ in range(rng.integers(3, 6)):
        radii = rng.uniform(6.0, 12.0, size=3)
        centre = rng.uniform(0.15, 0.85, size=3) * extent
        inside = (((grid - centre) / radii) ** 2).sum(-1) <= 1.0
        labels[inside] = 1
        contrast[inside] = rng.uniform(70.0, 100.0)

    # Partial-volume blur of the objects, then background drift and acquisition noise.
    contrast = ndimage.gaussian_filter(contrast, sigma=0.6 / spacing_arr)
    image = 200.0 + _smooth_field(rng, shape, 30.0) + contrast + rng.normal(0.0, 12.0, size=shape)
    image = np.clip(np.rint(image), 1, 65535).astype(np.float32)
    return image, labels


def zscore(image: np.ndarray) -> np.ndarray:
    """nnU-Net's ``ZScoreNormalization`` without a mask, operation for operation, so training sees the
    same inputs the predictor will."""
    image = image.astype(np.float32, copy=True)
    mean = image.mean()
    std = image.std()
    image -= mean
    image /= max(std, 1e-8)
    return image


# ---------------------------------------------------------------------------------------------- training


def build_network(n_classes: int) -> nn.Module:
    """The network nnU-Net will rebuild from ``plans.json``, so the state dict loads strictly."""
    kwargs = dict(ARCH_KWARGS)
    for key in ("conv_op", "norm_op", "dropout_op", "nonlin"):
        kwargs[key] = resolve_op(key, kwargs[key], "demo ARCH_KWARGS")  # the same allow-list as inference
    net = PlainConvUNet(input_channels=1, num_classes=n_classes, deep_supervision=False, **kwargs)
    net.apply(InitWeights_He(1e-2))
    return net


def _sample_patch(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, fg_voxels: list,
                  force_fg: bool) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net-style sampling: a third of patches are centred on a random voxel of a random class."""
    shape = np.asarray(image.shape)
    patch = np.asarray(PATCH_SIZE)
    present = [v for v in fg_voxels if len(v)]
    if force_fg and present:
        voxels = present[rng.integers(len(present))]
        centre = voxels[rng.integers(len(voxels))]
        start = np.clip(centre - patch // 2, 0, shape - patch)
    else:
        start = np.array([rng.integers(0, s - p + 1) for s, p in zip(shape, patch)])
    sl = tuple(slice(a, a + p) for a, p in zip(start, patch))
    img, seg = image[sl], labels[sl]
    for axis in range(3):  # the model is run with mirroring TTA over all three axes
        if rng.random() < 0.5:
            img, seg = np.flip(img, axis), np.flip(seg, axis)
    return np.ascontiguousarray(img), np.ascontiguousarray(seg)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """nnU-Net's default loss: cross-entropy plus batch soft Dice over the foreground classes."""
    ce = nn.functional.cross_entropy(logits, target)
    probs = torch.softmax(logits, 1)
    onehot = nn.functional.one_hot(target, n_classes).permute(0, 4, 1, 2, 3).to(probs.dtype)
    axes = (0, 2, 3, 4)
    intersect = (probs * onehot).sum(axes)[1:]
    denom = (probs.sum(axes) + onehot.sum(axes))[1:]
    dice = (2 * intersect + 1e-5) / (denom + 1e-5).clamp_min(1e-8)
    return ce - dice.mean()


def train_fold(fold: int, cases: list[tuple[np.ndarray, np.ndarray]], epochs: int, iters: int,
               lr: float) -> tuple[nn.Module, float]:
    """Train one fold on its own split and seed, as nnU-Net's cross-validation folds differ."""
    n = len(cases)
    held = set(range(fold * n // 5, (fold + 1) * n // 5))
    train = [c for i, c in enumerate(cases) if i not in held]
    val = [c for i, c in enumerate(cases) if i in held]
    torch.manual_seed(fold)
    rng = np.random.default_rng(100 + fold)
    n_classes = len(LABELS)
    net = build_network(n_classes)
    prepared = [(zscore(img), seg, [np.argwhere(seg == c) for c in range(1, n_classes)]) for img, seg in train]
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=3e-5)
    total = epochs * iters
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: (1 - step / total) ** 0.9)
    t0 = time.perf_counter()
    step = 0
    for epoch in range(epochs):
        net.train()
        losses = []
        for _ in range(iters):
            batch = [prepared[rng.integers(len(prepared))] for _ in range(BATCH_SIZE)]
            patches = [_sample_patch(rng, img, seg, fg, force_fg=(b == BATCH_SIZE - 1) or rng.random() < 0.33)
                       for b, (img, seg, fg) in enumerate(batch)]
            x = torch.from_numpy(np.stack([p[0] for p in patches])[:, None])
            y = torch.from_numpy(np.stack([p[1] for p in patches]).astype(np.int64))
            loss = dice_ce_loss(net(x), y, n_classes)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
        val_dice = _patch_val_dice(net, val, n_classes)
        print(f"fold {fold} epoch {epoch + 1}/{epochs} loss {np.mean(losses):.4f} "
              f"val patch dice {np.round(val_dice, 3).tolist()} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return net, time.perf_counter() - t0


@torch.inference_mode()
def _patch_val_dice(net: nn.Module, val: list, n_classes: int) -> list[float]:
    """A cheap progress signal (centre patches, no sliding window); the real figures come from nnunetv2."""
    net.eval()
    inter = np.zeros(n_classes - 1)
    denom = np.zeros(n_classes - 1)
    for img, seg in val:
        start = [(s - p) // 2 for s, p in zip(img.shape, PATCH_SIZE)]
        sl = tuple(slice(a, a + p) for a, p in zip(start, PATCH_SIZE))
        pred = net(torch.from_numpy(zscore(img)[sl][None, None].copy())).argmax(1)[0].numpy()
        for c in range(1, n_classes):
            inter[c - 1] += 2 * np.sum((pred == c) & (seg[sl] == c))
            denom[c - 1] += np.sum(pred == c) + np.sum(seg[sl] == c)
    return list(inter / np.maximum(denom, 1))


# ------------------------------------------------------------------------------------------ results folder


def _intensity_properties(cases: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    fg = np.concatenate([img[seg > 0] for img, seg in cases]).astype(np.float64)
    return {
        "max": float(fg.max()),
        "mean": float(fg.mean()),
        "median": float(np.median(fg)),
        "min": float(fg.min()),
        "percentile_00_5": float(np.percentile(fg, 0.5)),
        "percentile_99_5": float(np.percentile(fg, 99.5)),
        "std": float(fg.std()),
    }


def write_json_files(folder: Path, cases: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Full nnU-Net v2 ``dataset.json`` and ``plans.json``, as ``nnUNetv2_plan_and_preprocess`` would
    write them for this dataset, so the folder is indistinguishable from a real one."""
    median_shape = [int(v) for v in np.median([img.shape for img, _ in cases], axis=0)]
    dataset = {
        "name": DATASET,
        "description": "Synthetic demo volumes generated by scripts/train_demo_model.py: bright ellipsoids "
                       "(sphere) and darker tubes (tube) on a noisy, shaded background.",
        "licence": "CC0-1.0",
        "channel_names": {"0": "intensity"},
        "labels": LABELS,
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    resample_data_kwargs = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    plans = {
        "dataset_name": DATASET,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(SPACING),
        "original_median_shape_after_transp": median_shape,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": BATCH_SIZE,
                "patch_size": PATCH_SIZE,
                "median_image_size_in_voxels": median_shape,
                "spacing": list(SPACING),
                "normalization_schemes": ["ZScoreNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resample_data_kwargs,
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None},
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": ARCH_KWARGS,
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": True,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": _intensity_properties(cases)},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=4) + "\n")
    (folder / "plans.json").write_text(json.dumps(plans, indent=4) + "\n")


def save_checkpoint(net: nn.Module, path: Path, epochs: int) -> None:
    """An nnU-Net checkpoint with only what inference reads: no optimizer state and no numpy scalars in a
    training log, so it is small and loads with ``torch.load(weights_only=True)`` without an allow-list."""
    weights = OrderedDict((k, v.detach().to(torch.float32).contiguous()) for k, v in net.state_dict().items())
    checkpoint = {
        "network_weights": weights,
        "trainer_name": "nnUNetTrainer",
        "init_args": {"configuration": "3d_fullres"},
        "inference_allowed_mirroring_axes": (0, 1, 2),
        "current_epoch": epochs,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------- evaluation


def evaluate(folder: Path, folds: tuple[int, ...], seeds: list[int]) -> dict:
    """Dice per class through nnunetv2's own predictor: the figures a user of nnU-Net would reproduce."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=folds)
    names = [n for n in LABELS if LABELS[n] > 0]
    per_case = []
    t0 = time.perf_counter()
    for seed in seeds:
        img, gt = make_case(seed)
        seg = predictor.predict_single_npy_array(img[None], {"spacing": list(SPACING)}, None, None, False)
        dice = {}
        for name in names:
            c = LABELS[name]
            denom = np.sum(seg == c) + np.sum(gt == c)
            dice[name] = float(2 * np.sum((seg == c) & (gt == c)) / denom) if denom else 1.0
        per_case.append({"seed": seed, "dice": dice})
        print(f"held-out seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in dice.items()), flush=True)
    mean = {name: float(np.mean([c["dice"][name] for c in per_case])) for name in names}
    return {
        "predictor": "nnunetv2.inference.predict_from_raw_data.nnUNetPredictor (CPU, mirroring, step 0.5)",
        "folds": list(folds),
        "cases": per_case,
        "mean_dice_per_class": mean,
        "mean_foreground_dice": float(np.mean(list(mean.values()))),
        "seconds_per_case": (time.perf_counter() - t0) / len(seeds),
    }


def write_sample(path: Path) -> None:
    """The sample is stored as uint16 (its intensities are integers by construction), which keeps the file
    small without changing a single voxel."""
    image, labels = make_case(SAMPLE_SEED)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, image=image.astype(np.uint16), labels=labels,
                        spacing=np.asarray(SPACING, dtype=np.float64))
    tmp.replace(path)


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "src/napari_nnseg/demo_model",
                        help="folder that receives Dataset001_Demo/<trainer>__<plans>__<configuration>/")
    parser.add_argument("--sample-out", type=Path, default=ROOT / "src/napari_nnseg/demo_data/sample.npz")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--iters-per-epoch", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eval-cases", type=int, default=4)
    parser.add_argument("--skip-eval", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    t_start = time.perf_counter()
    folder = args.out / DATASET / RESULTS_SUBFOLDER
    cases = [make_case(TRAIN_SEED + i) for i in range(N_TRAIN_CASES)]
    for stale in folder.glob("fold_*"):
        if stale.is_dir() and int(stale.name.split("_")[1]) not in args.folds:
            shutil.rmtree(stale)
    write_json_files(folder, cases)
    write_sample(args.sample_out)

    train_seconds = {}
    for fold in args.folds:
        net, seconds = train_fold(fold, cases, args.epochs, args.iters_per_epoch, args.lr)
        save_checkpoint(net, folder / f"fold_{fold}" / "checkpoint_final.pth", args.epochs)
        train_seconds[f"fold_{fold}"] = round(seconds, 1)

    report: dict = {
        "training": {
            "epochs": args.epochs,
            "iterations_per_epoch": args.iters_per_epoch,
            "batch_size": BATCH_SIZE,
            "patch_size": PATCH_SIZE,
            "learning_rate": args.lr,
            "optimizer": "Adam, poly decay (exponent 0.9), loss CE + batch soft Dice, random flips on 3 axes",
            "n_training_cases": N_TRAIN_CASES,
            "seconds_per_fold": train_seconds,
            "torch_threads": torch.get_num_threads(),
        },
        "model_folder_bytes_without_this_report": _folder_size(args.out / DATASET),
    }
    if not args.skip_eval:
        seeds = [SAMPLE_SEED] + [HELDOUT_SEED + i for i in range(max(args.eval_cases - 1, 0))]
        report["evaluation"] = evaluate(folder, tuple(args.folds), seeds)
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    (folder / "demo_training_report.json").write_text(json.dumps(report, indent=4) + "\n")
    print(json.dumps(report, indent=2))
    if not args.skip_eval and report["evaluation"]["mean_foreground_dice"] < 0.9:
        raise SystemExit(f"mean foreground Dice {report['evaluation']['mean_foreground_dice']:.3f} < 0.9")


if __name__ == "__main__":
    main()
