"""Reading trained models: folder forms, folds, plans variants, and refusing anything that could run code."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from napari_nnseg import NnsegError, load_model
from napari_nnseg.model_folder import list_configurations


class _Evil:
    """Unpickling this would create a file: proof that a checkpoint ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_results_folder_loads_with_auto_detected_folds(tiny_two_fold_model):
    model = load_model(tiny_two_fold_model)
    assert model.folds == (0, 1)
    assert model.configuration == "3d_fullres"
    assert model.mirror_axes == (0, 1, 2)
    assert model.class_names[0] == "background" and len(model.class_names) >= 2
    assert "3d_fullres" in model.summary()


def test_parent_folder_with_several_configurations_needs_a_choice(tiny_two_fold_model, tmp_path):
    parent = tmp_path / "Dataset999_Toy"
    _copy(tiny_two_fold_model, parent / tiny_two_fold_model.name)
    other = _copy(tiny_two_fold_model, parent / "nnUNetTrainer__nnUNetPlans__3d_lowres")
    plans = json.loads((other / "plans.json").read_text())
    plans["configurations"]["3d_lowres"] = {"inherits_from": "3d_fullres"}
    (other / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(NnsegError, match="several trained configurations.*3d_fullres.*3d_lowres"):
        load_model(parent)
    assert sorted(list_configurations(parent)) == ["3d_fullres", "3d_lowres"]
    assert load_model(parent, configuration="3d_fullres").folder.name.endswith("3d_fullres")
    with pytest.raises(NnsegError, match="Configuration '2d' is not in"):
        load_model(parent, configuration="2d")


def test_checkpoint_configuration_and_inherits_from(tiny_two_fold_model, tmp_path):
    folder = _copy(tiny_two_fold_model, tmp_path / "nnUNetTrainer__nnUNetPlans__3d_lowres")
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_lowres"] = {"inherits_from": "3d_fullres", "batch_size": 7}
    (folder / "plans.json").write_text(json.dumps(plans))
    for fold in ("fold_0", "fold_1"):
        path = folder / fold / "checkpoint_final.pth"
        ckpt = torch.load(path, weights_only=False)
        ckpt["init_args"]["configuration"] = "3d_lowres"
        torch.save(ckpt, path)
    model = load_model(folder)
    assert model.configuration == "3d_lowres"
    assert model.config["batch_size"] == 7 and "architecture" in model.config


def test_explicit_folds_and_missing_fold(tiny_two_fold_model):
    assert load_model(tiny_two_fold_model, folds=1).folds == (1,)
    with pytest.raises(NnsegError, match="Fold 3 has no checkpoint_final.pth"):
        load_model(tiny_two_fold_model, folds=(0, 3))
    with pytest.raises(NnsegError, match="No fold .* holds 'checkpoint_best.pth'"):
        load_model(tiny_two_fold_model, checkpoint="checkpoint_best.pth")


def test_real_checkpoint_needs_the_allow_list(tiny_two_fold_model):
    path = tiny_two_fold_model / "fold_0" / "checkpoint_final.pth"
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # nnU-Net's logging holds numpy scalars
    assert load_model(tiny_two_fold_model, folds=0).fold_weights


def test_checkpoint_with_code_is_refused_and_runs_nothing(tiny_two_fold_model, tmp_path):
    folder = _copy(tiny_two_fold_model, tmp_path / tiny_two_fold_model.name)
    marker = tmp_path / "pwned"
    path = folder / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(path, weights_only=False)
    ckpt["payload"] = _Evil(marker)
    torch.save(ckpt, path)
    with pytest.raises(NnsegError, match="Refusing to load .*could run code"):
        load_model(folder, folds=0)
    assert not marker.exists()


@pytest.mark.parametrize(("key", "value"), [("nonlin", "builtins.print"), ("conv_op", "subprocess.Popen"),
                                            ("norm_op", "torch.nn.Identity")])
def test_plans_ops_come_from_the_allow_list(tiny_two_fold_model, tmp_path, key, value):
    folder = _copy(tiny_two_fold_model, tmp_path / tiny_two_fold_model.name)
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"][key] = value
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(NnsegError, match=f"{key} = '{value}' is not an allowed operation"):
        load_model(folder)


def test_unknown_network_class_is_refused(tiny_two_fold_model, tmp_path):
    folder = _copy(tiny_two_fold_model, tmp_path / tiny_two_fold_model.name)
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "os.system"
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(NnsegError, match="network_class_name 'os.system' is not a supported network"):
        load_model(folder)


def test_missing_mirroring_axes_means_no_mirroring(tiny_two_fold_model, tmp_path):
    folder = _copy(tiny_two_fold_model, tmp_path / tiny_two_fold_model.name)
    path = folder / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(path, weights_only=False)
    del ckpt["inference_allowed_mirroring_axes"]
    torch.save(ckpt, path)
    assert load_model(folder, folds=0).mirror_axes is None


@pytest.mark.parametrize("trainer", ["nnUNetTrainer_250epochs", "MyLabTrainer_v3", "nnUNetTrainerNoMirroring"])
def test_training_only_trainer_variants_load_with_the_plans_network(tiny_two_fold_model, tmp_path, trainer):
    folder = _copy(tiny_two_fold_model, tmp_path / f"{trainer}__nnUNetPlans__3d_fullres")
    path = folder / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(path, weights_only=False)
    ckpt["trainer_name"] = trainer
    torch.save(ckpt, path)
    assert load_model(folder, folds=0).trainer_name == trainer


def test_batchnorm_trainer_builds_batchnorm(tmp_path):
    from nnunet_reference import make_model_folder

    folder = make_model_folder(tmp_path, trainer_name="nnUNetTrainerBN", patch_size=(16, 16, 16),
                               features=(2, 4, 8))
    model = load_model(folder)
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in model.network().modules())


def test_primus_trainer_is_refused_clearly(tiny_two_fold_model, tmp_path):
    folder = _copy(tiny_two_fold_model, tmp_path / "nnUNet_Primus_M_Trainer__nnUNetPlans__3d_fullres")
    path = folder / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(path, weights_only=False)
    ckpt["trainer_name"] = "nnUNet_Primus_M_Trainer"
    torch.save(ckpt, path)
    with pytest.raises(NnsegError, match="Primus"):
        load_model(folder, folds=0)


def test_zip_from_nnunet_export_loads(tiny_two_fold_model, tmp_path, monkeypatch):
    results = tmp_path / "results"
    dataset = results / tiny_two_fold_model.parent.name
    folder = _copy(tiny_two_fold_model, dataset / tiny_two_fold_model.name)
    for fold in ("fold_0", "fold_1"):
        (folder / fold / "progress.png").write_bytes(b"png")
        (folder / fold / "validation").mkdir()
        (folder / fold / "validation" / "summary.json").write_text("{}")
    (folder / "dataset_fingerprint.json").write_text("{}")
    zip_path = tmp_path / "model.zip"
    code = ("from nnunetv2.model_sharing.model_export import export_pretrained_model as e; "
            f"e({dataset.name!r}, {str(zip_path)!r}, configurations=('3d_fullres',), folds=(0, 1))")
    env = {**os.environ, "nnUNet_results": str(results), "nnUNet_raw": str(tmp_path),
           "nnUNet_preprocessed": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    monkeypatch.setenv("NAPARI_NNSEG_CACHE", str(tmp_path / "cache"))
    model = load_model(zip_path)
    assert model.folds == (0, 1)
    assert (tmp_path / "cache").is_dir()


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt"])
def test_zip_with_escaping_members_is_refused(tmp_path, member, monkeypatch):
    monkeypatch.setenv("NAPARI_NNSEG_CACHE", str(tmp_path / "cache"))
    zip_path = tmp_path / "bad.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("Dataset1_X/T__P__3d_fullres/plans.json", "{}")
        zf.writestr(member, "gotcha")
    with pytest.raises(NnsegError, match="points outside the archive"):
        load_model(zip_path)
    assert not (tmp_path / "evil.txt").exists()
    assert not any((tmp_path / "cache").rglob("plans.json"))


def test_bad_paths_have_clear_errors(tmp_path):
    with pytest.raises(NnsegError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(NnsegError, match="No nnU-Net results folder found"):
        load_model(tmp_path)


def test_core_imports_without_napari_or_qt():
    code = ("import sys\n"
            "for m in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'magicgui'):\n"
            "    sys.modules[m] = None  # as if not installed: importing them raises ImportError\n"
            "from napari_nnseg import load_model, predict\n"
            "import napari_nnseg.predictor\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_checkpoints_load_concurrently(tiny_two_fold_model):
    from concurrent.futures import ThreadPoolExecutor

    from napari_nnseg.checkpoint import load_checkpoint

    path = tiny_two_fold_model / "fold_0" / "checkpoint_final.pth"
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: load_checkpoint(path), range(30)))
    assert all("network_weights" in r for r in results)
