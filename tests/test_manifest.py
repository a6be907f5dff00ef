"""The npe2 manifest: one source of truth, valid, importable, and cheap to list (no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ROOT / "src" / "napari_nnseg" / "napari.yaml"


def test_packaged_manifest_is_the_root_file():
    assert PACKAGED.is_symlink() and not Path(PACKAGED.readlink()).is_absolute()  # relative: survives copies
    assert PACKAGED.read_bytes() == (ROOT / "napari.yaml").read_bytes()


def test_manifest_names_match_the_distribution_and_commands_resolve():
    manifest = yaml.safe_load((ROOT / "napari.yaml").read_text())
    assert manifest["name"] == "napari-nnseg"
    contributions = manifest["contributions"]
    ids = {c["id"] for c in contributions["commands"]}
    assert all(i.startswith("napari-nnseg.") for i in ids)
    used = {w["command"] for w in contributions["widgets"]} | {s["command"] for s in contributions["sample_data"]}
    used |= {r["command"] for r in contributions["readers"]} | {w["command"] for w in contributions["writers"]}
    used |= {m["command"] for m in contributions["menus"]["napari/layers/segment"]}
    assert used <= ids


def test_npe2_validate_with_imports_passes():
    npe2 = Path(sys.executable).with_name("npe2")
    out = subprocess.run([str(npe2), "validate", "napari-nnseg", "--imports"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_listing_the_plugin_does_not_import_torch():
    code = ("import sys, napari_nnseg, npe2\n"
            "pm = npe2.PluginManager.instance(); pm.discover()\n"
            "pm.get_manifest('napari-nnseg').contributions.widgets\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
