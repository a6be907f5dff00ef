"""napari-nnseg against nnunetv2 on the same model folders and inputs: time, peak memory, agreement.

Run from the repository root in the test environment (nnunetv2 is a test/benchmark-only dependency):

    .tox/py311/bin/python benchmarks/compare_nnunet.py            # all cases, about 10 minutes on 2 cores
    .tox/py311/bin/python benchmarks/compare_nnunet.py --quick    # one run each, smaller inputs

Every measurement runs in a fresh subprocess (so peak RSS is that run's own), ours and nnU-Net's
alternating, and the script prints ratios (ours / nnU-Net), never absolute claims: these machines are noisy.

Cases
  a  compute-bound 3-D: a planner-like 5-stage U-Net, input near the target spacing
  b  export-bound: 16 classes, input spacing finer than the target, so resampling back to it dominates
  c  a 2-D configuration over a 3-D stack
Then: time and memory at three sizes of case a (per megavoxel), the "fast" preset against the default
(speed on a, Dice on synthetic cases and on the bundled demo), and our overhead over the forward passes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


# ----------------------------------------------------------------------------------------------- worker side
def _peak_rss_mb() -> float:
    """This process's own high-water mark (VmHWM).

    Not ``ru_maxrss``: on Linux that survives ``exec`` and starts at the forking parent's size, so every
    worker would report at least the driver's memory.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _forward_only_seconds(model, n_passes: int) -> float:
    """The forward passes our run made, alone: the bound no implementation of the same network beats."""
    import torch

    net = model.network().to("cpu")
    model.load_fold(net, 0)
    patch = model.patch_size
    x = torch.randn(1, model.num_input_channels, *patch)
    with torch.inference_mode():
        net(x)
        t0 = time.perf_counter()
        for _ in range(n_passes):
            net(x)
    return time.perf_counter() - t0


def worker(args) -> None:
    image = np.load(args.image)
    spacing = [float(s) for s in args.spacing.split(",")]
    folds = [int(f) for f in args.folds.split(",")]
    if args.worker == "ours":
        from napari_nnseg import load_model, predict

        model = load_model(args.model, folds=folds)
        base = _rss_mb()
        t0 = time.perf_counter()
        result = predict(model, image, spacing, device="cpu", preset=args.preset)
        seconds = time.perf_counter() - t0
        labels = result.labels
        info = result.info
        from napari_nnseg.sliding_window import mirror_combinations

        mirrored = len(mirror_combinations(info["mirror_axes"]))
        passes = info["tiles_per_fold"] * (1 + mirrored) * len(folds)
        extra = {"forward_only": _forward_only_seconds(model, passes) if args.forward_bound else None}
    else:
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False,
                                    allow_tqdm=False, verbose=False)
        predictor.initialize_from_trained_model_folder(args.model, use_folds=folds)
        base = _rss_mb()
        t0 = time.perf_counter()
        labels = predictor.predict_single_npy_array(image[None] if image.ndim == 3 else image,
                                                    {"spacing": spacing}, None, None, False)
        seconds = time.perf_counter() - t0
        extra = {}
    peak = _peak_rss_mb()
    np.save(args.out, labels)
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "base_mb": base, **extra}))


# ----------------------------------------------------------------------------------------------- driver side
def _run(impl: str, model: Path, image: Path, spacing, folds, out: Path, preset: str = "nnunet",
         forward_bound: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--model", str(model), "--image", str(image),
           "--spacing", ",".join(str(s) for s in spacing), "--folds", ",".join(str(f) for f in folds),
           "--out", str(out), "--preset", preset]
    if forward_bound:
        cmd.append("--forward-bound")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _dice(a: np.ndarray, b: np.ndarray, labels) -> float:
    scores = []
    for lab in labels:
        x, y = a == lab, b == lab
        denom = x.sum() + y.sum()
        if denom:
            scores.append(2 * np.logical_and(x, y).sum() / denom)
    return float(np.mean(scores)) if scores else 1.0


def _synthetic(make_case, seed: int):
    """(image, spacing, labels) of a new synthetic case from the demo model's own generator."""
    from train_demo_model import SPACING

    image, labels = make_case(seed)
    return image.astype(np.float32), SPACING, labels


def _cases(tmp: Path, quick: bool) -> dict:
    from nnunet_reference import make_image, make_model_folder

    s = 0.75 if quick else 1.0
    cases = {}
    model_a = make_model_folder(tmp / "a", patch_size=(32, 64, 64), spacing=(1.0, 1.0, 1.0),
                                features=(16, 32, 64, 128, 256), strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2],
                                                                         [2, 2, 2], [1, 2, 2]],
                                folds=(0,), seed=1)
    cases["a"] = (model_a, make_image((int(48 * s), int(96 * s), int(96 * s)), 1, seed=11)[0], (1.0, 1.0, 1.0))
    labels_b = {"background": 0, **{f"class{i}": i for i in range(1, 16)}}
    # thick-slice model (4 x 1 x 1 mm) on a finer scan: export resamples 14 classes up, with separate-z
    model_b = make_model_folder(tmp / "b", labels=labels_b, patch_size=(16, 48, 48), spacing=(4.0, 1.0, 1.0),
                                features=(4, 8, 16), strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]], folds=(0,), seed=2)
    cases["b"] = (model_b, make_image((int(96 * s), int(240 * s), int(240 * s)), 1, seed=12, sigma=3.0)[0],
                  (1.0, 0.4, 0.4))
    model_c = make_model_folder(tmp / "c", dims=2, patch_size=(64, 64), spacing=(0.8, 0.8),
                                features=(8, 16, 32, 64), folds=(0,), seed=3)
    cases["c"] = (model_c, make_image((int(24 * s), 160, 160), 1, seed=13)[0], (3.0, 0.8, 0.8))
    return cases


def _compare(name, model, image, spacing, tmp: Path, runs: int) -> dict:
    img_path = tmp / f"{name}.npy"
    np.save(img_path, image)
    ours, ref = [], []
    for r in range(runs):  # alternate, so drift in machine load hits both sides alike
        ours.append(_run("ours", model, img_path, spacing, [0], tmp / f"{name}_ours.npy",
                         forward_bound=(r == 0)))
        ref.append(_run("nnunet", model, img_path, spacing, [0], tmp / f"{name}_ref.npy"))
    batched = [_run("ours", model, img_path, spacing, [0], tmp / f"{name}_batched.npy", preset="batched")
               for _ in range(runs)]
    a, b = np.load(tmp / f"{name}_ours.npy"), np.load(tmp / f"{name}_ref.npy")
    a4 = np.load(tmp / f"{name}_batched.npy")
    t_ours = statistics.median(o["seconds"] for o in ours)
    t_ref = statistics.median(o["seconds"] for o in ref)
    row = {
        "case": name, "voxels_in": int(image.size), "time_ratio": t_ours / t_ref, "seconds_ours": t_ours,
        "seconds_nnunet": t_ref,
        "peak_rss_ratio": statistics.median(o["peak_mb"] for o in ours) / statistics.median(o["peak_mb"] for o in ref),
        "agreement": float((a == b).mean()),
        "overhead_over_forward": t_ours / ours[0]["forward_only"] - 1,
        "batched_time_ratio": statistics.median(o["seconds"] for o in batched) / t_ref,
        "batched_agreement": float((a4 == b).mean()),
    }
    print(f"case {name}: time ours/nnU-Net {row['time_ratio']:.2f} ({t_ours:.1f} s / {t_ref:.1f} s), "
          f"peak RSS ratio {row['peak_rss_ratio']:.2f}, "
          f"label agreement {100 * row['agreement']:.4f} %, overhead over forward passes "
          f"{100 * row['overhead_over_forward']:.1f} %; preset batched: time ratio {row['batched_time_ratio']:.2f}, "
          f"agreement {100 * row['batched_agreement']:.4f} %", flush=True)
    return row


def driver(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cases = _cases(tmp, args.quick)
        runs = 1 if args.quick else args.runs
        for name in args.cases:
            rows.append(_compare(name, *cases[name], tmp, runs))

        if "scaling" in args.extras:
            model, _, spacing = cases["a"]
            from nnunet_reference import make_image

            print("scaling of case a (ours), growing x:", flush=True)
            points = []
            for width in (128, 256, 384):
                image = make_image((32, 64, width), 1, seed=21)[0]
                np.save(tmp / "scale.npy", image)
                o = _run("ours", model, tmp / "scale.npy", spacing, [0], tmp / "scale_out.npy")
                points.append((image.size / 1e6, o["seconds"], o["peak_mb"]))
                print(f"  {image.shape}: {o['seconds']:.1f} s, peak RSS {o['peak_mb']:.0f} MB, "
                      f"{o['seconds'] / points[-1][0]:.1f} s/MVox", flush=True)
            for (m0, t0, p0), (m1, t1, p1) in zip(points, points[1:]):
                print(f"  marginal cost {m0:.2f}->{m1:.2f} MVox: {(t1 - t0) / (m1 - m0):.1f} s/MVox, "
                      f"{(p1 - p0) / (m1 - m0):.0f} MB/MVox", flush=True)

        if "preset" in args.extras:
            model, image, spacing = cases["a"]
            np.save(tmp / "p.npy", image)
            default = _run("ours", model, tmp / "p.npy", spacing, [0], tmp / "p_default.npy")
            fast = _run("ours", model, tmp / "p.npy", spacing, [0], tmp / "p_fast.npy", preset="fast")
            print(f"preset fast on case a: {default['seconds'] / fast['seconds']:.1f}x faster than default",
                  flush=True)
            # accuracy needs a trained model: the bundled demo model on its sample and on new synthetic cases
            sys.path.insert(0, str(ROOT / "scripts"))
            from train_demo_model import make_case

            from napari_nnseg.demo import demo_model_path, demo_sample, demo_sample_labels

            volumes = [("demo sample", *demo_sample(), demo_sample_labels())]
            volumes += [(f"synthetic seed {seed}", *_synthetic(make_case, seed)) for seed in (7001, 7002)]
            for name, vol, vol_spacing, truth in volumes:
                np.save(tmp / "v.npy", vol)
                outs = {}
                for preset in ("nnunet", "batched", "fast"):
                    outs[preset] = _run("ours", demo_model_path(), tmp / "v.npy", vol_spacing, [0, 1],
                                        tmp / f"v_{preset}.npy", preset=preset)
                d, f = np.load(tmp / "v_nnunet.npy"), np.load(tmp / "v_fast.npy")
                bt = np.load(tmp / "v_batched.npy")
                print(f"preset batched vs default on {name}: {100 * (bt == d).mean():.4f} % voxels equal, "
                      f"{outs['nnunet']['seconds'] / outs['batched']['seconds']:.1f}x faster", flush=True)
                print(f"preset fast vs default on {name}: Dice {_dice(f, d, (1, 2)):.4f}, "
                      f"{outs['nnunet']['seconds'] / outs['fast']['seconds']:.1f}x faster; Dice to truth "
                      f"default {_dice(d, truth, (1, 2)):.4f}, fast {_dice(f, truth, (1, 2)):.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["ours", "nnunet"])
    p.add_argument("--model"), p.add_argument("--image"), p.add_argument("--spacing"), p.add_argument("--out")
    p.add_argument("--folds", default="0")
    p.add_argument("--preset", default="nnunet")
    p.add_argument("--forward-bound", action="store_true")
    p.add_argument("--cases", nargs="*", default=["a", "b", "c"])
    p.add_argument("--extras", nargs="*", default=["scaling", "preset"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    if args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
