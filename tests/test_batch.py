"""The batch runner behind ``napari-nnseg predict`` and ``napari_nnseg.predict_folder`` (issue #4).

What must hold: case discovery follows nnU-Net's ``CASE_XXXX`` naming with clear errors; a file goes
read -> predict -> write -> read back with its geometry and the same labels ``predict`` gives in memory;
``overwrite=False`` skips finished cases; a bad case fails alone; an interrupted run leaves no partial file;
and a real dask ``LocalCluster`` (2 worker processes on loopback, no mocks) writes byte-identical files to a
serial run, loading the model once per worker.
"""

from __future__ import annotations

import csv
import filecmp
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pytest.importorskip("nnunetv2")

from napari_nnseg import load_model, predict, predict_folder, read_image  # noqa: E402
from napari_nnseg.batch import find_cases  # noqa: E402
from napari_nnseg.errors import NnsegError  # noqa: E402

SPACING = (2.0, 0.8, 0.8)  # (z, y, x), the tiny model's target spacing: one 16^3 tile per 8x16x16 image


def tiny_model_folder(tmp_path_factory) -> Path:
    """One tiny 1-channel, 2-fold results folder per test session (shared by the batch and CLI tests)."""
    root = tmp_path_factory.getbasetemp() / "nnseg_tiny_model"
    folder = root / "Dataset999_Toy" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    if not (root / ".complete").is_file():
        from nnunet_reference import make_model_folder

        folder = make_model_folder(root, folds=(0, 1), patch_size=(16, 16, 16), spacing=SPACING, features=(4, 8),
                                   seed=4)
        (root / ".complete").write_text("ok")
    return folder


def write_case(folder: Path, name: str, seed: int, shape=(8, 16, 16), affine=None) -> Path:
    from nnunet_reference import make_image

    folder.mkdir(parents=True, exist_ok=True)
    image = make_image(shape, seed=seed)[0]  # (z, y, x)
    if affine is None:
        affine = np.diag([SPACING[2], SPACING[1], SPACING[0], 1.0])
        affine[:3, 3] = [5.0, -3.0, 12.0]
    path = folder / name
    nib.save(nib.Nifti1Image(image.T, affine), str(path))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for k in range(3):
        write_case(folder, f"case{k}_0000.nii.gz", seed=k)
    return folder


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------------------------------------
# case discovery
# ---------------------------------------------------------------------------------------------------------


def test_find_cases_groups_channels_like_nnunet(tmp_path):
    for name in ["b_0001.nii.gz", "b_0000.nii.gz", "a_0000.nii.gz", "single.nii.gz", ".hidden_0000.nii.gz",
                 "notes.txt", "c_0000.tif"]:
        (tmp_path / name).write_bytes(b"")
    cases = {c.case_id: c for c in find_cases(tmp_path, num_channels=2, channel_names=("T1", "T2"))}
    assert set(cases) == {"a", "b", "single", "c"}
    assert [Path(f).name for f in cases["b"].files] == ["b_0000.nii.gz", "b_0001.nii.gz"]
    assert cases["b"].problem is None and cases["b"].output_name() == "b.nii.gz"
    assert cases["c"].output_name() == "c.tif"
    assert cases["single"].problem is None  # may be a 4-D file; its channels are checked when read

    (tmp_path / "a_0002.nii.gz").write_bytes(b"")
    (tmp_path / "b_0002.nii.gz").write_bytes(b"")
    cases = {c.case_id: c for c in find_cases(tmp_path, num_channels=2, channel_names=("T1", "T2"))}
    assert "case 'b': found 3 channel files" in cases["b"].problem and "expects 2 (T1, T2)" in cases["b"].problem
    assert "not numbered _0000, _0001" in cases["a"].problem

    with pytest.raises(NnsegError, match="does not exist"):
        find_cases(tmp_path / "nope", 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NnsegError, match="No image files"):
        find_cases(tmp_path / "empty", 1)


def test_output_may_not_overwrite_an_input(model, tmp_path):
    case = write_case(tmp_path, "brain.nii.gz", seed=1)
    with pytest.raises(NnsegError, match="would overwrite the input"):
        predict_folder([case], tmp_path, model, device="cpu")


# ---------------------------------------------------------------------------------------------------------
# serial runs
# ---------------------------------------------------------------------------------------------------------


def test_round_trip_file_predict_write_read_back(model, images, tmp_path):
    """read -> predict -> write -> read back: geometry and labels survive, equal to the in-memory API."""
    events = []
    summary = predict_folder(images, tmp_path / "out", model, device="cpu", use_mirroring=False,
                             save_probabilities=True, progress=events.append)
    assert summary.ok and [r.status for r in summary.results] == ["ok"] * 3
    assert {e.kind for e in events} == {"start", "step", "case", "done"}
    for k in range(3):
        src = images / f"case{k}_0000.nii.gz"
        out = tmp_path / "out" / f"case{k}.nii.gz"
        image, spacing, _ = read_image(src)
        expected = predict(model, image, spacing, device="cpu", use_mirroring=False, return_probabilities=True)
        back, back_spacing, _ = read_image(out)
        assert np.array_equal(back[0], expected.labels)
        assert back_spacing == spacing
        assert np.allclose(nib.load(str(out)).affine, nib.load(str(src)).affine)
        assert nib.load(str(out)).get_data_dtype() == np.uint8
        with np.load(tmp_path / "out" / f"case{k}.npz") as npz:
            assert npz["probabilities"].dtype == np.float32
            assert np.allclose(npz["probabilities"], expected.probabilities, atol=1e-6)
    rows = _rows(summary.summary_csv)
    assert [r["case"] for r in rows] == ["case0", "case1", "case2"]
    assert set(rows[0]) >= {"case", "status", "seconds", "uncertainty", "fold_disagreement", "voxels_background",
                            "voxels_organ", "voxels_tumor", "output", "error"}
    for row, result in zip(rows, summary.results):
        assert 0.0 <= float(row["uncertainty"]) <= 1.0 and 0.0 <= float(row["fold_disagreement"]) <= 1.0
        assert sum(int(row[c]) for c in row if c.startswith("voxels_")) == 8 * 16 * 16
        assert int(row["voxels_organ"]) == result.voxels["voxels_organ"]


def test_bad_cases_fail_alone_and_continue_skips_finished(model, images, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(2):
        (folder / f"case{k}_0000.nii.gz").write_bytes((images / f"case{k}_0000.nii.gz").read_bytes())
    (folder / "corrupt_0000.nii.gz").write_bytes(b"\x1f\x8b truncated")
    write_case(folder, "twochan_0000.nii.gz", seed=5)
    write_case(folder, "twochan_0001.nii.gz", seed=6)
    out = tmp_path / "out"
    summary = predict_folder(folder, out, model, device="cpu", use_mirroring=False)
    status = {r.case_id: r for r in summary.results}
    assert not summary.ok and {k for k, r in status.items() if r.status == "ok"} == {"case0", "case1"}
    assert "corrupt_0000.nii.gz" in status["corrupt"].error
    assert "case 'twochan': found 2 channel files" in status["twochan"].error
    assert "expects 1 (" in status["twochan"].error
    assert sorted(p.name for p in out.iterdir()) == ["case0.nii.gz", "case1.nii.gz", "summary.csv"]
    assert "Failed:" in summary.report() and "corrupt" in summary.report()

    first = {p.name: p.stat().st_mtime_ns for p in out.glob("case*.nii.gz")}
    uncertainty = status["case0"].uncertainty
    (out / ".case2.partial-deadbeef.nii.gz").write_bytes(b"left by a killed run")  # must not count as done
    (folder / "case2_0000.nii.gz").write_bytes((images / "case2_0000.nii.gz").read_bytes())
    summary = predict_folder(folder, out, model, device="cpu", use_mirroring=False, overwrite=False)
    status = {r.case_id: r for r in summary.results}
    assert status["case0"].status == status["case1"].status == "skipped"
    assert status["case2"].status == "ok"
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("case[01].nii.gz")} == first
    rows = {r["case"]: r for r in _rows(out / "summary.csv")}
    assert rows["case0"]["status"] == "skipped" and float(rows["case0"]["uncertainty"]) == pytest.approx(
        uncertainty, abs=1e-6)


def test_interrupt_leaves_no_partial_output(model, images, tmp_path):
    out = tmp_path / "out"

    def progress(event):
        if event.kind == "step" and event.case_id == "case1":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_folder(images, out, model, device="cpu", use_mirroring=False, progress=progress)
    assert sorted(p.name for p in out.iterdir()) == ["case0.nii.gz", "summary.csv"]
    assert [r["status"] for r in _rows(out / "summary.csv")] == ["ok", "cancelled", "cancelled"]


# ---------------------------------------------------------------------------------------------------------
# dask.distributed
# ---------------------------------------------------------------------------------------------------------


def test_local_cluster_matches_serial_run(model, images, tmp_path):
    """A real 2-process LocalCluster on loopback: same files as serial, one model load per worker."""
    distributed = pytest.importorskip("distributed")
    folder = tmp_path / "in"
    folder.mkdir()
    for p in images.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    write_case(folder, "case3_0000.nii.gz", seed=3)
    (folder / "corrupt_0000.nii.gz").write_bytes(b"garbage")

    serial = predict_folder(folder, tmp_path / "serial", model, device="cpu", use_mirroring=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        parallel = predict_folder(folder, tmp_path / "dask", model, device="cpu", use_mirroring=False,
                                  scheduler=cluster.scheduler_address)
    assert parallel.workers == 2
    assert [(r.case_id, r.status) for r in parallel.results] == [(r.case_id, r.status) for r in serial.results]
    assert [r.status for r in parallel.results].count("failed") == 1
    for r in parallel.results:
        if r.status == "ok":
            name = Path(r.output).name
            assert filecmp.cmp(tmp_path / "serial" / name, tmp_path / "dask" / name, shallow=False), name
            assert r.info["worker_model_loads"] == 1
            assert r.voxels == next(s for s in serial.results if s.case_id == r.case_id).voxels
    assert len({r.info["worker"] for r in parallel.results if r.status == "ok"}) >= 1
    assert "corrupt" in [r.case_id for r in parallel.failed]
