"""``napari-nnseg`` on the command line, run in subprocesses as a user runs it (issue #4).

The headline check runs our CLI and nnunetv2's own ``predict_from_files_sequential`` on the same folder
(including an oblique, anisotropic NIfTI that gets resampled) and requires identical label arrays on identical
grids, and the same probabilities. Then: nnU-Net's flag spellings, ``--continue``, a bad case among good ones
(exit status 1, the reason printed), ``--workers 2`` on a real local dask cluster writing byte-identical
files, usage errors (exit status 2), and the demo command when the bundled demo model is installed.
"""

from __future__ import annotations

import filecmp
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("nnunetv2")

from test_batch import tiny_model_folder, write_case  # noqa: E402


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "napari_nnseg.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _oblique_affine() -> np.ndarray:
    from scipy.spatial.transform import Rotation

    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", [15, -10, 30], degrees=True).as_matrix() @ np.diag([0.9, 0.85, 2.5])
    affine[:3, 0] *= -1
    affine[:3, 3] = [-40.0, 12.5, 7.0]
    return affine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli_in")
    write_case(folder, "plain_0000.nii.gz", seed=11)
    write_case(folder, "oblique_0000.nii.gz", seed=12, shape=(7, 18, 17), affine=_oblique_affine())
    return folder


@pytest.fixture(scope="module")
def serial_run(model_dir, inputs, tmp_path_factory):
    """Our CLI with nnU-Net's own flag spellings (the aliases must work)."""
    out = tmp_path_factory.mktemp("cli_out")
    proc = run_cli("predict", "-i", inputs, "-o", out, "-m", model_dir, "-f", "0", "1", "-chk",
                   "checkpoint_final.pth", "-step_size", "0.5", "--disable_tta", "-device", "cpu",
                   "--save_probabilities")
    return proc, out


def test_cli_output_equals_nnunetv2_predict_from_files(model_dir, inputs, serial_run, tmp_path):
    proc, ours = serial_run
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "2 case(s): 2 ok, 0 failed" in proc.stdout and "summary.csv" in proc.stdout
    assert "[2/2] ok" in proc.stderr

    import torch
    from nnunet_reference import reference_predictor

    ref = tmp_path / "ref"
    ref.mkdir()
    predictor = reference_predictor(model_dir, folds=(0, 1), use_mirroring=False)
    threads = torch.get_num_threads()
    try:
        predictor.predict_from_files_sequential(str(inputs), str(ref), save_probabilities=True, overwrite=True)
    finally:
        torch.set_num_threads(threads)
    for case in ("plain", "oblique"):
        a, b = sitk.ReadImage(str(ref / f"{case}.nii.gz")), sitk.ReadImage(str(ours / f"{case}.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)), case
        assert a.GetPixelIDValue() == b.GetPixelIDValue()
        assert np.allclose(a.GetSpacing(), b.GetSpacing()) and np.allclose(a.GetOrigin(), b.GetOrigin())
        assert np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
        assert len(np.unique(sitk.GetArrayFromImage(a))) >= 2  # a constant prediction would prove nothing
        with np.load(ref / f"{case}.npz") as r, np.load(ours / f"{case}.npz") as o:
            assert r["probabilities"].shape == o["probabilities"].shape
            assert np.allclose(r["probabilities"], o["probabilities"], atol=1e-3)


def test_cli_workers_write_identical_files(model_dir, inputs, serial_run, tmp_path):
    """--workers 2: a real LocalCluster (2 processes, 1 thread each, loopback); same bytes as the serial run."""
    pytest.importorskip("distributed")
    _, serial = serial_run
    proc = run_cli("predict", "-i", inputs, "-o", tmp_path, "-m", model_dir, "--disable-tta", "--device", "cpu",
                   "--save-probabilities", "--workers", "2")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "on 2 worker(s)" in proc.stdout
    for name in ("plain.nii.gz", "oblique.nii.gz"):
        assert filecmp.cmp(serial / name, tmp_path / name, shallow=False), name
    # float32 softmax bits depend on torch's thread count (NNUNET_FACTS.md §6.4): the serial run uses every
    # core, each worker one thread, so probabilities may differ in the last ulp -- labels may not.
    for name in ("plain.npz", "oblique.npz"):
        with np.load(serial / name) as a, np.load(tmp_path / name) as b:
            assert np.allclose(a["probabilities"], b["probabilities"], rtol=0, atol=1e-6)


def test_cli_failures_are_listed_and_continue_skips(model_dir, inputs, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "plain_0000.nii.gz").write_bytes((inputs / "plain_0000.nii.gz").read_bytes())
    write_case(folder, "twochan_0000.nii.gz", seed=1)
    write_case(folder, "twochan_0001.nii.gz", seed=2)
    out = tmp_path / "out"
    proc = run_cli("predict", "-i", folder, "-o", out, "-m", model_dir, "--disable-tta", "--device", "cpu")
    assert proc.returncode == 1, proc.stderr + proc.stdout
    assert "1 ok, 1 failed" in proc.stdout and "Failed:" in proc.stdout
    assert "case 'twochan': found 2 channel files" in proc.stdout and "expects 1 (" in proc.stdout
    assert (out / "plain.nii.gz").is_file() and not (out / "twochan.nii.gz").exists()
    mtime = (out / "plain.nii.gz").stat().st_mtime_ns

    (folder / "twochan_0001.nii.gz").unlink()
    proc = run_cli("predict", "-i", folder, "-o", out, "-m", model_dir, "--disable-tta", "--device", "cpu",
                   "--continue")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "1 ok, 0 failed, 1 skipped" in proc.stdout and "skipped plain" in proc.stderr
    assert (out / "plain.nii.gz").stat().st_mtime_ns == mtime and (out / "twochan.nii.gz").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_cli_usage_errors(model_dir, tmp_path):
    proc = run_cli("predict", "-i", tmp_path, "-o", tmp_path / "o", "-m", tmp_path / "no_model")
    assert proc.returncode == 2 and "error: Model path" in proc.stderr
    proc = run_cli("predict", "-i", tmp_path, "-o", tmp_path / "o", "-m", model_dir, "--workers", "2",
                   "--scheduler", "tcp://127.0.0.1:1")
    assert proc.returncode == 2 and "not both" in proc.stderr
    proc = run_cli("predict", "-i", tmp_path, "-o", tmp_path / "o", "-m", model_dir)
    assert proc.returncode == 2 and "No image files" in proc.stderr
    assert run_cli().returncode == 2


def test_cli_demo(tmp_path):
    demo = pytest.importorskip("napari_nnseg.demo")
    if not (demo.demo_model_path() / "fold_0" / "checkpoint_final.pth").is_file():
        pytest.skip("the bundled demo model is not built yet")
    proc = run_cli("demo", "-o", tmp_path, "--disable-tta", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "Dice:" in proc.stdout
    assert (tmp_path / "labels" / "sample.nii.gz").is_file()
    assert (tmp_path / "images" / "sample_0000.nii.gz").is_file()


def test_progress_printer_bar_and_log_lines():
    from napari_nnseg.batch import BatchProgress, CaseResult
    from napari_nnseg.cli import ProgressPrinter

    events = [BatchProgress("start", "a", 0, 2, 0), BatchProgress("step", "a", 0, 2, 0, 3, 4),
              BatchProgress("case", "a", 0, 2, 1, result=CaseResult("a", "ok", 1.5)),
              BatchProgress("case", "b", 1, 2, 2, result=CaseResult("b", "failed", error="bad file")),
              BatchProgress("done", n_cases=2, finished=2)]
    tty, log = io.StringIO(), io.StringIO()
    for stream, interactive in ((tty, True), (log, False)):
        printer = ProgressPrinter(stream, interactive=interactive, min_interval=0)
        for event in events:
            printer(event)
    assert "[###############-----]  75%" in tty.getvalue() and "overall" in tty.getvalue()
    assert log.getvalue().splitlines() == ["[1/2] ok      a (1.5 s)", "[2/2] FAILED  b: bad file"]


def test_demo_command_in_process(model_dir, monkeypatch, tmp_path, capsys):
    """The demo's file handling and report, with the tiny model standing in for the bundled one."""
    from nnunet_reference import make_image

    from napari_nnseg import cli, demo

    image = make_image((8, 16, 16), seed=21)[0]
    truth = (image > np.median(image)).astype(np.uint8)
    monkeypatch.setattr(demo, "demo_model_path", lambda: model_dir)
    monkeypatch.setattr(demo, "demo_sample", lambda: (image, (2.0, 0.8, 0.8)))
    monkeypatch.setattr(demo, "demo_sample_labels", lambda: truth)
    assert cli.main(["demo", "-o", str(tmp_path), "--disable-tta", "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "Dice:" in out and "organ" in out and "tumor" in out
    assert (tmp_path / "labels" / "sample.nii.gz").is_file() and (tmp_path / "labels" / "summary.csv").is_file()
    truth_back = nib.load(str(tmp_path / "ground_truth" / "sample.nii.gz"))
    assert np.array_equal(np.asanyarray(truth_back.dataobj).T, truth)
    assert np.allclose(truth_back.affine, nib.load(str(tmp_path / "labels" / "sample.nii.gz")).affine)


def test_cli_tile_batch_size_runs_and_is_recorded(model_dir, inputs, serial_run, tmp_path):
    """--tile-batch-size batches tiles; labels may differ only at near-ties, so compare, not byte-equal."""
    import nibabel as nib

    _, serial = serial_run
    proc = run_cli("predict", "-i", inputs, "-o", tmp_path, "-m", model_dir, "-f", "0", "1", "--disable-tta",
                   "--device", "cpu", "--tile-batch-size", "3")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    for name in ("plain.nii.gz", "oblique.nii.gz"):
        a = np.asarray(nib.load(serial / name).dataobj)
        b = np.asarray(nib.load(tmp_path / name).dataobj)
        assert a.shape == b.shape and (a == b).mean() > 0.99
