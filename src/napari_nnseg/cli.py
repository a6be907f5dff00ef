"""The ``napari-nnseg`` command: segment image files with a trained nnU-Net v2 model, or run the demo.

``napari-nnseg predict`` mirrors ``nnUNetv2_predict_from_modelfolder`` (same flags where they mean the same,
nnU-Net's spellings accepted as aliases) so existing scripts port easily, and adds what a batch needs:
files *or* folders as input, a dask cluster (``--workers``/``--scheduler``), a ``summary.csv`` with an
uncertainty score per case, a progress bar and an exit status that says whether any case failed.
``napari-nnseg demo`` runs the bundled demo model on the bundled sample: one command to see it work.

Exit status: 0 all cases ok (or skipped), 1 some case failed, 2 bad arguments/model/output folder,
130 interrupted.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import TextIO

from .errors import NnsegError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# ----------------------------------------------------------------------------------------------------------
# progress display
# ----------------------------------------------------------------------------------------------------------


def _bar(fraction: float, width: int) -> str:
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class ProgressPrinter:
    """Per-case and overall progress on stderr, without dependencies.

    On a terminal one line is redrawn (case bar + overall bar) and each finished case prints a line above
    it; when stderr is a file or pipe (logs, CI) only the per-case lines are printed, so logs stay readable.
    """

    def __init__(self, stream: TextIO | None = None, enabled: bool = True, interactive: bool | None = None,
                 min_interval: float = 0.1):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.case = ""
        self.case_fraction = 0.0
        self.finished = 0
        self.n_cases = 0
        self.min_interval = min_interval  # seconds between redraws; tiles can be much faster than a terminal
        self._last_draw = 0.0
        self._drawn = False

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        self.n_cases = event.n_cases or self.n_cases
        if event.kind == "start":
            self.case, self.case_fraction = event.case_id, 0.0
            self._draw(force=True)
        elif event.kind == "step":
            self.case_fraction = event.step / event.n_steps if event.n_steps else 0.0
            self._draw()
        elif event.kind == "case":
            self.finished = event.finished
            r = event.result
            if r.status == "ok":
                text = f"ok      {r.case_id} ({r.seconds:.1f} s)"
            elif r.status == "skipped":
                text = f"skipped {r.case_id} (output exists)"
            else:
                text = f"FAILED  {r.case_id}: {r.error}"
            self._clear()
            print(f"[{self.finished}/{self.n_cases}] {text}", file=self.stream, flush=True)
            if self.case == r.case_id:
                self.case, self.case_fraction = "", 0.0
            self._draw(force=True)
        elif event.kind == "done":
            self._clear()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._drawn = False

    def _draw(self, force: bool = False) -> None:
        if not self.interactive or not self.n_cases:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        width = shutil.get_terminal_size((100, 20)).columns
        overall = (self.finished + self.case_fraction) / self.n_cases
        case = f"{self.case[:24]} {_bar(self.case_fraction, 20)} {int(self.case_fraction * 100):3d}%  " \
            if self.case else ""
        line = f"{case}overall {_bar(overall, 20)} {self.finished}/{self.n_cases}"
        self.stream.write("\r\x1b[2K" + line[: max(10, width - 1)])
        self.stream.flush()
        self._drawn = True


# ----------------------------------------------------------------------------------------------------------
# argument parsing
# ----------------------------------------------------------------------------------------------------------


def _fold(value: str) -> int | str:
    if value == "all":
        return "all"
    try:
        return int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"fold must be a number or 'all', got {value!r}") from exc


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step-size", "-step_size", "--step_size", dest="step_size", type=float, default=0.5,
                   help="sliding-window step as a fraction of the patch (default 0.5, nnU-Net's; larger is faster)")
    p.add_argument("--disable-tta", "--disable_tta", dest="disable_tta", action="store_true",
                   help="no test-time mirroring (about 8x faster for 3D, results differ slightly)")
    p.add_argument("--tile-batch-size", "--tile_batch_size", dest="tile_batch_size", type=int, default=1,
                   help="tiles per network call (default 1 = nnU-Net's bit-identical labels; 4 is several "
                        "times faster on CPUs, changing only the logits' last bits)")
    p.add_argument("--device", "-device", dest="device", default="auto",
                   help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--not-on-device", "--not_on_device", dest="not_on_device", action="store_true",
                   help="keep result buffers in CPU memory (for large images on a small GPU)")
    p.add_argument("--quiet", "--disable_progress_bar", dest="quiet", action="store_true",
                   help="no progress output (the summary is still printed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-nnseg", allow_abbrev=False,
        description="Run trained nnU-Net v2 models; labels identical to nnUNetv2_predict.")
    sub = parser.add_subparsers(dest="command", metavar="{predict,demo}")

    p = sub.add_parser(
        "predict", allow_abbrev=False, help="segment image files or folders",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Segment images with an nnU-Net v2 results folder (or exported zip).\n"
                    "Inputs are files or folders; CASE_0000.nii.gz, CASE_0001.nii.gz ... are the channels of CASE,\n"
                    "as in nnU-Net. Writes CASE.nii.gz (the input's ending) per case and summary.csv.",
        epilog="example:\n  napari-nnseg predict -i imagesTs -o predictions \\\n"
               "      -m Dataset001_X/nnUNetTrainer__nnUNetPlans__3d_fullres -f 0 1 2 3 4 --workers 2")
    p.add_argument("-i", "--input", dest="inputs", nargs="+", required=True, metavar="INPUT",
                   help="image files and/or folders")
    p.add_argument("-o", "--output", dest="output", required=True, metavar="OUTPUT_DIR", help="output folder")
    p.add_argument("-m", "--model", dest="model", required=True,
                   help="nnU-Net results folder (Trainer__Plans__configuration, or the dataset folder above it) "
                        "or a zip from nnUNetv2_export_model_to_zip")
    p.add_argument("-c", "--configuration", dest="configuration", default=None,
                   help="configuration when the model path holds several (e.g. 3d_fullres)")
    p.add_argument("-f", "--folds", dest="folds", nargs="+", type=_fold, default=None,
                   help="folds to ensemble (default: every trained fold), e.g. -f 0 1 2 3 4 or -f all")
    p.add_argument("-chk", "--checkpoint", dest="checkpoint", default="checkpoint_final.pth",
                   help="checkpoint file name (default checkpoint_final.pth)")
    _add_run_options(p)
    p.add_argument("--save-probabilities", "--save_probabilities", dest="save_probabilities", action="store_true",
                   help="also write CASE.npz with float32 'probabilities' (C, *image array shape)")
    p.add_argument("--continue", "--continue_prediction", "--c", dest="continue_", action="store_true",
                   help="skip cases whose outputs already exist (resume an interrupted run)")
    p.add_argument("--workers", dest="workers", type=_positive_int, default=0,
                   help="run cases in parallel on a local dask cluster of N worker processes "
                        "(needs napari-nnseg[cluster])")
    p.add_argument("--scheduler", dest="scheduler", default=None, metavar="ADDRESS",
                   help="use a running dask scheduler, e.g. tcp://10.0.0.1:8786 (workers must see the files)")
    p.add_argument("--no-uncertainty", dest="no_uncertainty", action="store_true",
                   help="skip the per-case uncertainty score in summary.csv (slightly faster)")

    d = sub.add_parser("demo", allow_abbrev=False, help="run the bundled demo model on the bundled sample",
                       description="Segment the bundled sample volume with the bundled demo nnU-Net model, "
                                   "write image, labels and ground truth as NIfTI, and print the Dice scores.")
    d.add_argument("-o", "--output", dest="output", default="nnseg-demo", metavar="DIR",
                   help="folder for the demo files (default ./nnseg-demo)")
    _add_run_options(d)
    return parser


# ----------------------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------------------


def _predict(args: argparse.Namespace) -> int:
    from .batch import predict_folder
    from .model import load_model

    model = load_model(args.model, configuration=args.configuration, folds=args.folds, checkpoint=args.checkpoint)
    folds = ", ".join(str(f) for f in model.folds)
    where = (f"dask scheduler {args.scheduler}" if args.scheduler
             else f"{args.workers} local worker(s)" if args.workers else f"device {args.device}")
    print(f"model: {model.folder} ({model.configuration}, folds {folds}, {model.checkpoint}); {where}",
          file=sys.stderr, flush=True)
    summary = predict_folder(
        args.inputs, args.output, model, device=args.device, tile_step_size=args.step_size,
        use_mirroring=not args.disable_tta, perform_everything_on_device=not args.not_on_device,
        tile_batch_size=args.tile_batch_size, save_probabilities=args.save_probabilities, overwrite=not args.continue_,
        uncertainty=not args.no_uncertainty, workers=args.workers, scheduler=args.scheduler,
        progress=ProgressPrinter(enabled=not args.quiet))
    print(summary.report())
    return EXIT_OK if summary.ok else EXIT_FAILED


def dice_scores(prediction, truth, class_names: dict[int, str]) -> dict[str, float]:
    """Dice per foreground class (1.0 when a class is absent from both)."""
    import numpy as np

    scores = {}
    for value, name in sorted(class_names.items()):
        if value == 0:
            continue
        p, t = prediction == value, truth == value
        denominator = int(p.sum()) + int(t.sum())
        scores[name] = 1.0 if denominator == 0 else 2.0 * int(np.logical_and(p, t).sum()) / denominator
    return scores


def _demo(args: argparse.Namespace) -> int:
    from .batch import predict_folder
    from .image_files import geometry_for_array, read_image, write_image, write_labels
    from .model import load_model

    try:
        from . import demo
        model_path = demo.demo_model_path()
        image, spacing = demo.demo_sample()
    except (ImportError, OSError) as exc:
        raise NnsegError(f"The bundled demo model or sample is missing from this installation ({exc}); "
                         "reinstall napari-nnseg.") from exc
    out = Path(args.output).expanduser()
    geometry = geometry_for_array(image.shape, spacing)
    image_file = write_image(_mkdir(out / "images") / "sample_0000.nii.gz", image, geometry)
    model = load_model(model_path)
    print(f"demo: nnU-Net v2 model {model.dataset_name} ({model.configuration}, folds "
          f"{', '.join(str(f) for f in model.folds)}) on a {'x'.join(map(str, image.shape))} volume "
          f"(spacing {', '.join(f'{s:g}' for s in spacing)})", file=sys.stderr, flush=True)
    from .predictor import estimate_cost

    cost = estimate_cost(model, image.shape, spacing, args.step_size, not args.disable_tta)
    hint = "" if args.disable_tta else "; --disable-tta runs 1 pass per tile (faster, not nnU-Net's default)"
    print(f"  {cost['tiles']} tile(s) x {cost['mirror_passes']} mirrored pass(es) x {cost['folds']} fold(s) = "
          f"{cost['forward_passes']} network passes{hint}", file=sys.stderr, flush=True)
    summary = predict_folder(
        [image_file], out / "labels", model, device=args.device, tile_step_size=args.step_size,
        use_mirroring=not args.disable_tta, perform_everything_on_device=not args.not_on_device,
        tile_batch_size=args.tile_batch_size, progress=ProgressPrinter(enabled=not args.quiet))
    if not summary.ok:
        print(summary.report())
        return EXIT_FAILED
    result = summary.results[0]
    labels_file = Path(result.output)
    lines = [f"napari-nnseg demo finished in {summary.seconds:.1f} s "
             f"({result.info.get('device', args.device)}, "
             f"{'no mirroring' if args.disable_tta else 'with test-time mirroring'})",
             f"  image:        {image_file}", f"  labels:       {labels_file}"]
    counts = ", ".join(f"{k.removeprefix('voxels_')} {v}" for k, v in result.voxels.items())
    lines.append(f"  voxels:       {counts}")
    truth_fn = getattr(demo, "demo_sample_labels", None)
    if truth_fn is not None:
        try:
            truth = truth_fn()
        except (OSError, KeyError):
            truth = None
        if truth is not None:
            truth_file = write_labels(_mkdir(out / "ground_truth") / "sample.nii.gz", truth, geometry)
            predicted = read_image(labels_file)[0][0]
            scores = dice_scores(predicted, truth, model.class_names)
            lines.append(f"  ground truth: {truth_file}")
            lines.append("  Dice:         " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    if result.uncertainty is not None:
        lines.append(f"  uncertainty:  {result.uncertainty:.3f} (mean normalised entropy over predicted foreground)")
    lines.append(f"  view:         napari {image_file} {labels_file}")
    lines.append("Your own model: napari-nnseg predict -i IMAGES_FOLDER -o OUTPUT_FOLDER -m NNUNET_RESULTS_FOLDER")
    print("\n".join(lines))
    return EXIT_OK


def _mkdir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NnsegError(f"Cannot create the folder {str(path)!r} ({exc}).") from exc
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``napari-nnseg`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "workers", 0) and getattr(args, "scheduler", None):
        parser.error("use either --workers (a local cluster) or --scheduler (an existing one), not both")
    try:
        return _predict(args) if args.command == "predict" else _demo(args)
    except NnsegError as exc:
        print(f"napari-nnseg: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nnapari-nnseg: interrupted. Every output under its final name is complete (partial files only "
              "ever have hidden .partial names); re-run with --continue to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
