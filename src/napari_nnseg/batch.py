"""Segment many image files: one machine (model loaded once, cases streamed) or a dask.distributed cluster.

Why it is built this way (DESIGN.md "Scaling out"):

* The model is loaded once per process -- in this process for a serial run, once per dask worker process
  otherwise (a per-process cache, so a worker that runs 100 cases reads the checkpoints once).
* Cases stream: a serial run holds one case in memory; a cluster run keeps at most ``2 × workers`` cases in
  flight and submits the next one as each finishes, so memory is bounded by what is in flight, not by the
  size of the batch.
* A failing case (unreadable file, wrong channel count, out of memory) is reported with its reason and the
  rest go on; the summary and the exit status say what failed.
* Every output is written under a temporary name in the output folder and renamed when complete, so a
  crash or Ctrl-C never leaves a half-written result, and ``overwrite=False`` (``--continue``) can trust any
  file it finds.
* Outputs are named as ``nnUNetv2_predict`` names them (``CASE`` + the input's ending, probabilities in
  ``CASE.npz`` under ``probabilities``), and a ``summary.csv`` lists per case the status, time, voxels per
  class and an uncertainty score from the fold ensemble, so curators can review the least certain first.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import NnsegError
from .image_files import SUPPORTED_ENDINGS, atomic_path, file_ending, read_image, write_labels

SUMMARY_NAME = "summary.csv"
_CASE_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


# ----------------------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One image to segment: its channel files in channel order and the name its outputs get.

    ``problem`` is set when the files cannot make a valid input (e.g. too many channel files); such a case is
    reported as failed without being read.
    """

    case_id: str
    files: tuple[str, ...]
    ending: str
    problem: str | None = None

    def output_name(self) -> str:
        return self.case_id + self.ending


def _split_name(path: Path) -> tuple[str, int | None, str]:
    """``CASE_0001.nii.gz`` -> (``CASE``, 1, ``.nii.gz``); ``brain.nii.gz`` -> (``brain``, None, ``.nii.gz``)."""
    ending = file_ending(path)
    stem = path.name[: -len(ending)]
    match = _CASE_RE.match(stem)
    if match:
        return match["case"], int(match["channel"]), ending
    return stem, None, ending


def find_cases(inputs: str | os.PathLike | Iterable[str | os.PathLike], num_channels: int,
               channel_names: Sequence[str] = ()) -> list[Case]:
    """Group input files into cases, as nnU-Net does for a folder.

    ``inputs`` are folders and/or files. Files named ``CASE_XXXX<ending>`` are the channels of ``CASE`` (sorted
    by ``XXXX``); any other supported file is a one-file case (a 4-D file may hold several channels). Hidden
    files and unsupported endings in folders are ignored. A case whose files cannot fit the model's channels
    gets a ``problem`` that names the case, what was found and what was expected.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            files.extend(sorted(c for c in p.iterdir() if c.is_file() and not c.name.startswith(".")
                                and file_ending(c)))
        elif p.is_file():
            if not file_ending(p):
                raise NnsegError(f"Input {str(p)!r} is not a supported image file ({', '.join(SUPPORTED_ENDINGS)}).")
            files.append(p)
        else:
            raise NnsegError(f"Input {str(p)!r} does not exist. Give image files or folders of them.")
    if not files:
        raise NnsegError("No image files found in the inputs (looked for "
                         f"{', '.join(SUPPORTED_ENDINGS)}; hidden files are ignored).")

    groups: dict[str, list[tuple[int | None, Path, str]]] = {}
    for f in dict.fromkeys(files):  # de-duplicate, keep order
        case_id, channel, ending = _split_name(f)
        groups.setdefault(case_id, []).append((channel, f, ending))

    names = f" ({', '.join(channel_names)})" if channel_names else ""
    cases: list[Case] = []
    for case_id, members in groups.items():
        folders = {m[1].parent.resolve() for m in members}
        endings = {m[2] for m in members}
        numbered = [m for m in members if m[0] is not None]
        plain = [m for m in members if m[0] is None]
        problem = None
        if len(folders) > 1:
            problem = (f"case {case_id!r} has files in several folders ({', '.join(sorted(map(str, folders)))}); "
                       f"its outputs would collide. Rename one of them.")
        elif len(endings) > 1:
            problem = f"case {case_id!r} mixes file types ({', '.join(sorted(endings))}); use one format per case."
        elif plain and numbered:
            problem = (f"case {case_id!r} has both {plain[0][1].name} and channel files "
                       f"({', '.join(m[1].name for m in numbered)}); keep one naming.")
        elif len(plain) > 1:
            problem = f"case {case_id!r} is given twice ({', '.join(m[1].name for m in plain)})."
        members = sorted(members, key=lambda m: (m[0] if m[0] is not None else -1, m[1].name))
        if problem is None and numbered:
            indices = [m[0] for m in numbered]
            found = ", ".join(m[1].name for m in numbered)
            if len(indices) > num_channels:
                problem = (f"case {case_id!r}: found {len(indices)} channel files ({found}) but the model expects "
                           f"{num_channels}{names}.")
            elif indices != list(range(len(indices))):
                expected = ", ".join(f"_{i:04d}" for i in range(num_channels))
                problem = (f"case {case_id!r}: channel files {found} are not numbered {expected}; the model "
                           f"expects {num_channels} channel(s){names}.")
        cases.append(Case(case_id, tuple(str(m[1]) for m in members), members[0][2], problem))
    return cases


# ----------------------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    """What happened to one case; one row of ``summary.csv``."""

    case_id: str
    status: str  # "ok" | "failed" | "skipped" | "cancelled"
    seconds: float = 0.0
    output: str = ""
    voxels: dict[str, int] = field(default_factory=dict)
    uncertainty: float | None = None
    fold_disagreement: float | None = None
    error: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchProgress:
    """A progress event for a batch run.

    ``kind`` is ``"start"`` (a case begins), ``"step"`` (a tile of the running case; ``step``/``n_steps``),
    ``"case"`` (a case finished; ``result`` set) or ``"done"``. ``finished`` counts finished cases of
    ``n_cases``. Cluster runs send no ``"step"`` events (the tiles run on the workers).
    """

    kind: str
    case_id: str = ""
    index: int = 0
    n_cases: int = 0
    finished: int = 0
    step: int = 0
    n_steps: int = 0
    message: str = ""
    result: CaseResult | None = None


@dataclass
class BatchSummary:
    """The outcome of :func:`predict_folder`: one :class:`CaseResult` per case, in input order."""

    results: list[CaseResult]
    output_dir: Path
    summary_csv: Path
    seconds: float
    class_names: dict[int, str]
    workers: int = 0

    def _with(self, status: str) -> list[CaseResult]:
        return [r for r in self.results if r.status == status]

    @property
    def succeeded(self) -> list[CaseResult]:
        return self._with("ok")

    @property
    def failed(self) -> list[CaseResult]:
        return self._with("failed")

    @property
    def skipped(self) -> list[CaseResult]:
        return self._with("skipped")

    @property
    def ok(self) -> bool:
        """True when no case failed or was cancelled."""
        return all(r.status in ("ok", "skipped") for r in self.results)

    def report(self, least_certain: int = 5) -> str:
        """A short text for people: counts, the least certain cases, and every failure with its reason."""
        n = len(self.results)
        cancelled = self._with("cancelled")
        where = f" on {self.workers} worker(s)" if self.workers else ""
        lines = [f"{n} case(s): {len(self.succeeded)} ok, {len(self.failed)} failed, {len(self.skipped)} skipped"
                 + (f", {len(cancelled)} cancelled" if cancelled else "") + f" in {self.seconds:.1f} s{where}."]
        scored = sorted((r for r in self.results if r.status == "ok" and r.uncertainty is not None),
                        key=lambda r: -(r.uncertainty or 0.0))
        if scored and least_certain:
            lines.append("Least certain (review first): " + ", ".join(
                f"{r.case_id} {r.uncertainty:.3f}" for r in scored[:least_certain]))
        if self.failed:
            lines.append("Failed:")
            lines.extend(f"  {r.case_id}: {r.error}" for r in self.failed)
        lines.append(f"Summary: {self.summary_csv}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOptions:
    """Prediction settings shared by every case (picklable, so it travels to dask workers)."""

    device: str = "auto"
    tile_step_size: float = 0.5
    use_mirroring: bool = True
    perform_everything_on_device: bool = True
    save_probabilities: bool = False
    uncertainty: bool = True
    tile_batch_size: int = 1


def _outputs(case: Case, output_dir: Path, options: RunOptions) -> list[Path]:
    out = [output_dir / case.output_name()]
    if options.save_probabilities:
        out.append(output_dir / (case.case_id + ".npz"))
    return out


def _class_column(name: str) -> str:
    return "voxels_" + re.sub(r"[^0-9A-Za-z_-]+", "_", str(name)).strip("_")


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, NnsegError) else f"{type(exc).__name__}: {text}"


def run_case(model, case: Case, output_dir: str | os.PathLike, options: RunOptions,
             on_step: Callable[[int, int, str], None] | None = None) -> CaseResult:
    """Read, predict and write one case; never raises for a problem with the case itself.

    ``KeyboardInterrupt`` is not caught: it stops the batch, and the atomic writes leave nothing behind.
    """
    from .predictor import predict_steps

    started = time.perf_counter()
    output_dir = Path(output_dir)
    out_labels = output_dir / case.output_name()
    try:
        if case.problem:
            raise NnsegError(case.problem)
        image, spacing, geometry = read_image(case.files)
        if image.shape[0] != model.num_input_channels:
            files = ", ".join(Path(f).name for f in case.files)
            hint = ""
            if image.shape[0] < model.num_input_channels and len(case.files) == image.shape[0]:
                missing = ", ".join(f"{case.case_id}_{i:04d}{case.ending}"
                                    for i in range(image.shape[0], model.num_input_channels))
                hint = f" Add {missing}."
            raise NnsegError(f"case {case.case_id!r}: found {image.shape[0]} channel(s) ({files}) but the model "
                             f"expects {model.num_input_channels} ({', '.join(model.channel_names)}).{hint}")
        gen = predict_steps(model, image, spacing, device=options.device, tile_step_size=options.tile_step_size,
                            use_mirroring=options.use_mirroring, tile_batch_size=options.tile_batch_size,
                            perform_everything_on_device=options.perform_everything_on_device,
                            return_probabilities=options.save_probabilities,
                            return_uncertainty=options.uncertainty)
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                result = stop.value
                break
            if on_step is not None and event.n_steps:  # tiles only; other stages have no count
                on_step(event.step, event.n_steps, event.message)
        del image
        labels = np.asarray(result.labels)
        write_labels(out_labels, labels, geometry)
        if options.save_probabilities:
            with atomic_path(output_dir / (case.case_id + ".npz")) as tmp, open(tmp, "wb") as fh:
                np.savez_compressed(fh, probabilities=np.asarray(result.probabilities, dtype=np.float32))
        counts = np.bincount(labels.ravel().astype(np.int64), minlength=max(model.class_names, default=0) + 1)
        voxels = {_class_column(name): int(counts[value]) if value < counts.size else 0
                  for value, name in sorted(model.class_names.items())}
        uncertainty = disagreement = None
        if result.uncertainty is not None:
            fg = labels > 0
            region = fg if fg.any() else np.ones_like(fg)  # no foreground: how unsure is "nothing here"?
            uncertainty = float(np.asarray(result.uncertainty)[region].mean())
            if result.fold_disagreement is not None:
                disagreement = float(np.asarray(result.fold_disagreement)[region].mean())
        return CaseResult(case.case_id, "ok", time.perf_counter() - started, str(out_labels), voxels,
                          uncertainty, disagreement, info={"device": result.info.get("device", "")})
    except Exception as exc:  # one bad case must not stop the batch
        return CaseResult(case.case_id, "failed", time.perf_counter() - started, error=_error_text(exc))


# ----------------------------------------------------------------------------------------------------------
# dask workers
# ----------------------------------------------------------------------------------------------------------

# One model per worker process: loading reads every fold's checkpoint, so it is done once and re-used.
# The lock serialises predictions inside one process, because the model's network is shared and each fold's
# weights are loaded into it in turn (a worker started with --nthreads > 1 would otherwise mix folds).
_WORKER_MODEL: dict[str, Any] = {"key": None, "model": None, "loads": 0}
_WORKER_LOCK = threading.Lock()


def _worker_run_case(spec: tuple, case: Case, output_dir: str, options: RunOptions,
                     torch_threads: int | None) -> CaseResult:
    """The task a dask worker runs: load (or re-use) the model, run one case, report where it ran."""
    with _WORKER_LOCK:
        import torch

        from .model import load_model

        threads = torch_threads
        if threads is None:
            try:
                from distributed import get_worker

                threads = int(get_worker().state.nthreads)
            except Exception:
                threads = None
        if threads:
            torch.set_num_threads(max(1, threads))
        if _WORKER_MODEL["key"] != spec:
            _WORKER_MODEL.update(key=None, model=None)  # free the previous model before loading another
            folder, configuration, folds, checkpoint = spec
            try:
                model = load_model(folder, configuration=configuration, folds=list(folds), checkpoint=checkpoint)
            except Exception as exc:
                return CaseResult(case.case_id, "failed", error="the worker could not load the model: "
                                  + _error_text(exc))
            _WORKER_MODEL.update(key=spec, model=model, loads=_WORKER_MODEL["loads"] + 1)
        result = run_case(_WORKER_MODEL["model"], case, output_dir, options)
        try:
            from distributed import get_worker

            address = get_worker().address
        except Exception:
            address = f"pid {os.getpid()}"
        result.info.update(worker=address, worker_model_loads=_WORKER_MODEL["loads"])
        return result


def _connect(workers: int, scheduler: str | None):
    """A dask client for ``scheduler``, or a loopback LocalCluster of ``workers`` single-threaded processes."""
    try:
        import logging

        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise NnsegError("Running on several workers needs dask.distributed: pip install 'napari-nnseg[cluster]' "
                         "(or run without --workers/--scheduler).") from exc
    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except Exception as exc:
            raise NnsegError(f"Cannot reach the dask scheduler at {scheduler!r} ({exc}). Start it with "
                             "`dask scheduler` and workers with `dask worker ADDRESS`.") from exc
        return client, None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None, silence_logs=logging.ERROR)
    return Client(cluster), cluster


def _n_workers(client, wait_s: float = 60.0) -> int:
    try:
        client.wait_for_workers(1, timeout=wait_s)
    except Exception as exc:
        raise NnsegError(f"The dask cluster has no workers after {wait_s:.0f} s; start some with "
                         "`dask worker SCHEDULER_ADDRESS`.") from exc
    return max(1, len(client.scheduler_info().get("workers", {})))


# ----------------------------------------------------------------------------------------------------------
# summary.csv
# ----------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def write_summary(path: Path, results: Sequence[CaseResult], class_names: dict[int, str]) -> Path:
    """``summary.csv``: one row per case (status, seconds, uncertainty, voxels per class, output, error)."""
    class_cols = [_class_column(n) for _, n in sorted(class_names.items())]
    columns = ["case", "status", "seconds", "uncertainty", "fold_disagreement", *class_cols, "output", "error"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for r in results:
        writer.writerow([r.case_id, r.status, _fmt(r.seconds, 2), _fmt(r.uncertainty, 6),
                         _fmt(r.fold_disagreement, 6), *[r.voxels.get(c, "") for c in class_cols], r.output,
                         " ".join(r.error.split())])
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    return path


def _previous_rows(path: Path) -> dict[str, dict[str, str]]:
    """Rows of an earlier ``summary.csv``, so cases skipped by ``--continue`` keep their numbers."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return {row["case"]: row for row in csv.DictReader(fh) if row.get("case")}
    except (OSError, csv.Error, KeyError, UnicodeDecodeError):
        return {}


def _skipped_result(case: Case, output_dir: Path, previous: dict[str, dict[str, str]]) -> CaseResult:
    result = CaseResult(case.case_id, "skipped", output=str(output_dir / case.output_name()))
    row = previous.get(case.case_id)
    if row and row.get("status") in ("ok", "skipped"):
        def number(key: str, kind=float):
            try:
                return kind(row[key])
            except (KeyError, TypeError, ValueError):
                return None

        result.uncertainty = number("uncertainty")
        result.fold_disagreement = number("fold_disagreement")
        result.voxels = {k: v for k in row if k.startswith("voxels_") and (v := number(k, int)) is not None}
    return result


# ----------------------------------------------------------------------------------------------------------
# the runner
# ----------------------------------------------------------------------------------------------------------


def predict_folder(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    model,
    *,
    configuration: str | None = None,
    folds: Sequence[int | str] | int | str | None = None,
    checkpoint: str = "checkpoint_final.pth",
    device: str = "auto",
    tile_step_size: float = 0.5,
    use_mirroring: bool = True,
    perform_everything_on_device: bool = True,
    save_probabilities: bool = False,
    overwrite: bool = True,
    tile_batch_size: int = 1,
    uncertainty: bool = True,
    workers: int = 0,
    scheduler: str | None = None,
    progress: Callable[[BatchProgress], None] | None = None,
) -> BatchSummary:
    """Segment every case in ``inputs`` and write the labels (and optionally probabilities) to ``output_dir``.

    Parameters
    ----------
    inputs
        Image files and/or folders; ``CASE_0000<ending>``, ``CASE_0001<ending>`` … are one case's channels
        (nnU-Net's naming), any other file is a case of its own.
    output_dir
        Created if needed. Gets ``CASE<ending>`` per case, ``CASE.npz`` with ``save_probabilities`` and
        ``summary.csv``.
    model
        A results folder / exported zip (loaded once here), or an already loaded ``NnUNetModel``.
    configuration, folds, checkpoint
        As :func:`napari_nnseg.load_model`, used when ``model`` is a path.
    device, tile_step_size, use_mirroring, perform_everything_on_device, tile_batch_size
        As :func:`napari_nnseg.predict`.
    save_probabilities
        Also write float32 class probabilities ``(C, *image array shape)`` to ``CASE.npz``.
    overwrite
        ``False`` skips cases whose outputs already exist (nnU-Net's ``--continue_prediction``).
    uncertainty
        Compute the per-case uncertainty score for ``summary.csv`` (costs a little time per case).
    workers
        ``0`` runs here; ``N`` starts a local dask cluster of ``N`` single-threaded worker processes.
    scheduler
        Address of a running dask scheduler (``tcp://host:8786``) to use instead; workers must see the
        model and image paths (a shared file system).
    progress
        Called with :class:`BatchProgress` events (on this thread).

    Returns a :class:`BatchSummary`; check ``summary.ok``. Problems with single cases do not raise; a bad
    model or output folder does (``NnsegError``). ``KeyboardInterrupt`` writes the summary so far (the rest
    marked ``cancelled``) and propagates.
    """
    from .model import NnUNetModel, load_model

    started = time.perf_counter()
    if not isinstance(model, NnUNetModel):
        model = load_model(model, configuration=configuration, folds=folds, checkpoint=checkpoint)
    output_dir = Path(output_dir).expanduser()
    cases = find_cases(inputs, model.num_input_channels, model.channel_names)
    _check_outputs(cases, output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NnsegError(f"Cannot create the output folder {str(output_dir)!r} ({exc}).") from exc
    options = RunOptions(device=str(device), tile_step_size=float(tile_step_size), use_mirroring=bool(use_mirroring),
                         perform_everything_on_device=bool(perform_everything_on_device),
                         save_probabilities=bool(save_probabilities), uncertainty=bool(uncertainty),
                         tile_batch_size=int(tile_batch_size))
    summary_csv = output_dir / SUMMARY_NAME
    previous = _previous_rows(summary_csv) if not overwrite else {}
    results: dict[int, CaseResult] = {}
    n = len(cases)
    emit = progress or (lambda event: None)
    todo: list[int] = []
    for i, case in enumerate(cases):
        if not overwrite and all(p.is_file() for p in _outputs(case, output_dir, options)):
            results[i] = _skipped_result(case, output_dir, previous)
        elif case.problem:  # known bad before reading anything: report it, do not send it anywhere
            results[i] = CaseResult(case.case_id, "failed", error=case.problem)
        else:
            todo.append(i)
            continue
        emit(BatchProgress("case", case.case_id, i, n, len(results), result=results[i]))

    last_write = [time.perf_counter()]

    def finish(i: int, result: CaseResult) -> None:
        results[i] = result
        emit(BatchProgress("case", result.case_id, i, n, len(results), result=result))
        if time.perf_counter() - last_write[0] > 30:  # a crash still leaves a recent summary
            write_summary(summary_csv, [results[k] for k in sorted(results)], model.class_names)
            last_write[0] = time.perf_counter()

    n_workers = 0
    try:
        if (workers and workers > 0) or scheduler:
            n_workers = _run_on_cluster(model, cases, todo, output_dir, options, workers, scheduler, finish,
                                        lambda i: emit(BatchProgress("start", cases[i].case_id, i, n, len(results),
                                                                     message="queued")))
        else:
            for i in todo:
                case = cases[i]
                emit(BatchProgress("start", case.case_id, i, n, len(results)))

                def on_step(step: int, n_steps: int, message: str, _i=i, _case=case) -> None:
                    emit(BatchProgress("step", _case.case_id, _i, n, len(results), step, n_steps, message))

                finish(i, run_case(model, case, output_dir, options, on_step))
    except KeyboardInterrupt:
        for i, case in enumerate(cases):
            results.setdefault(i, CaseResult(case.case_id, "cancelled", error="interrupted"))
        write_summary(summary_csv, [results[k] for k in sorted(results)], model.class_names)
        raise
    ordered = [results[k] for k in sorted(results)]
    write_summary(summary_csv, ordered, model.class_names)
    summary = BatchSummary(ordered, output_dir, summary_csv, time.perf_counter() - started, model.class_names,
                           workers=n_workers)
    emit(BatchProgress("done", n_cases=n, finished=n))
    return summary


def _check_outputs(cases: Sequence[Case], output_dir: Path) -> None:
    """Refuse runs whose outputs would overwrite an input or each other, before anything is written."""
    inputs = {Path(f).resolve() for c in cases for f in c.files}
    seen: dict[str, str] = {}
    for case in cases:
        target = (output_dir / case.output_name()).resolve()
        if target in inputs:
            raise NnsegError(f"The output {str(target)!r} would overwrite the input image of case "
                             f"{case.case_id!r}. Choose another output folder (-o).")
        key = case.output_name()
        if key in seen:
            raise NnsegError(f"Two inputs ({seen[key]} and {case.files[0]}) would both be written to {key}; "
                             "rename one of them.")
        seen[key] = case.files[0]


def _run_on_cluster(model, cases: Sequence[Case], todo: Sequence[int], output_dir: Path, options: RunOptions,
                    workers: int, scheduler: str | None, finish, on_submit) -> int:
    """Stream ``todo`` through a dask cluster, at most ``2 × workers`` cases in flight."""
    client, cluster = _connect(workers, scheduler)
    try:
        from distributed import as_completed

        n_workers = _n_workers(client)
        # A local cluster shares this machine's cores between its processes; on a user's cluster each worker
        # uses its own --nthreads (looked up inside the task).
        torch_threads = max(1, (os.cpu_count() or 1) // n_workers) if cluster is not None else None
        spec = (str(model.folder), model.configuration, tuple(model.folds), model.checkpoint)
        window = 2 * n_workers
        queue = iter(todo)
        running: dict[Any, int] = {}
        pool = as_completed()

        def submit_next() -> bool:
            i = next(queue, None)
            if i is None:
                return False
            case = cases[i]
            future = client.submit(_worker_run_case, spec, case, str(output_dir), options, torch_threads,
                                   pure=False, key=f"nnseg-{case.case_id}-{os.urandom(4).hex()}")
            running[future] = i
            pool.add(future)
            on_submit(i)
            return True

        for _ in range(window):
            if not submit_next():
                break
        for future in pool:
            i = running.pop(future)
            try:
                result = future.result()
            except Exception as exc:  # the worker died (e.g. killed for memory) or the task could not run
                result = CaseResult(cases[i].case_id, "failed", error="the worker failed: " + _error_text(exc))
            future.release()
            finish(i, result)
            submit_next()
        return n_workers
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
