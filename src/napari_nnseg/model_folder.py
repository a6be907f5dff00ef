"""Finding an nnU-Net v2 results folder and its folds on disk.

Users point at whatever they have: the ``Trainer__Plans__configuration`` folder itself, the dataset folder
above it (several configurations side by side), or the zip written by ``nnUNetv2_export_model_to_zip``.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .errors import NnsegError
from .safe_archive import extract_zip_safely

_FOLD_RE = re.compile(r"^fold_(\d+|all)$")


def is_results_folder(path: Path) -> bool:
    """A results folder holds ``dataset.json`` and ``plans.json`` next to ``fold_*`` folders."""
    return (
        path.is_dir()
        and (path / "dataset.json").is_file()
        and (path / "plans.json").is_file()
        and any(_FOLD_RE.match(p.name) for p in path.iterdir() if p.is_dir())
    )


def _configuration_of(folder: Path) -> str:
    """``Trainer__Plans__configuration`` -> ``configuration`` (the whole name when it has another form)."""
    parts = folder.name.split("__")
    return parts[-1] if len(parts) == 3 else folder.name


def _candidates(root: Path, max_depth: int = 3) -> list[Path]:
    found: list[Path] = []
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        if is_results_folder(folder):
            found.append(folder)
            continue
        if depth >= max_depth:
            continue
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            continue
        stack.extend((c, depth + 1) for c in reversed(children))
    return sorted(found)


def _cache_dir() -> Path:
    base = os.environ.get("NAPARI_NNSEG_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "napari-nnseg" / "models"


def _extract_model_zip(zip_path: Path) -> Path:
    """Extract once per zip content into the cache; the digest makes re-use safe when the zip changes."""
    digest = hashlib.sha256()
    with open(zip_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    target = _cache_dir() / digest.hexdigest()[:16]
    if not (target / ".complete").is_file():
        extract_zip_safely(zip_path, target)
        (target / ".complete").write_text(str(zip_path))
    return target


def find_results_folder(path: str | os.PathLike, configuration: str | None = None) -> Path:
    """Resolve ``path`` (folder or zip) to one results folder, picking ``configuration`` where several exist."""
    path = Path(path).expanduser()
    if not path.exists():
        raise NnsegError(f"Model path {str(path)!r} does not exist. Choose an nnU-Net results folder "
                         "(one holding dataset.json, plans.json and fold_N/) or an exported model zip.")
    if path.is_file():
        if path.suffix.lower() != ".zip":
            raise NnsegError(f"Model path {str(path)!r} is a file but not a .zip. Choose the results folder "
                             "or the zip written by nnUNetv2_export_model_to_zip.")
        path = _extract_model_zip(path)

    candidates = _candidates(path)
    if not candidates:
        raise NnsegError(
            f"No nnU-Net results folder found in {str(path)!r}: expected a folder holding dataset.json, "
            "plans.json and fold_N/ subfolders (e.g. nnUNetTrainer__nnUNetPlans__3d_fullres).")
    if configuration is not None:
        chosen = [c for c in candidates if configuration in (c.name, _configuration_of(c))]
        if len(chosen) == 1:
            return chosen[0]
        names = ", ".join(c.name for c in candidates)
        if not chosen:
            raise NnsegError(f"Configuration {configuration!r} is not in {str(path)!r}; available: {names}.")
        raise NnsegError(f"Configuration {configuration!r} matches several folders in {str(path)!r}: "
                         f"{', '.join(c.name for c in chosen)}. Pass the full folder name instead.")
    if len(candidates) == 1:
        return candidates[0]
    names = ", ".join(_configuration_of(c) if len({_configuration_of(x) for x in candidates}) == len(candidates)
                      else c.name for c in candidates)
    raise NnsegError(f"{str(path)!r} holds several trained configurations; choose one with "
                     f"configuration=...: {names}.")


def list_configurations(path: str | os.PathLike) -> list[str]:
    """Names a user can pass as ``configuration`` for ``path`` (for the GUI dropdown)."""
    path = Path(path)
    if path.is_file():
        path = _extract_model_zip(path)
    cands = _candidates(path)
    short = [_configuration_of(c) for c in cands]
    return short if len(set(short)) == len(short) else [c.name for c in cands]


def fold_folder_name(fold: int | str) -> str:
    return "fold_all" if str(fold) == "all" else f"fold_{int(fold)}"


def detect_folds(results_folder: Path, checkpoint: str) -> list[int | str]:
    """Folds as nnU-Net auto-detects them: numbered ``fold_N`` folders that hold ``checkpoint``.

    nnU-Net lists them in sorted folder-name order (so fold_10 sorts before fold_2); the order matters for
    the fp16 sum of folds, so keep it. ``fold_all`` is used only when nothing else exists.
    """
    names = sorted(p.name for p in results_folder.iterdir() if p.is_dir() and _FOLD_RE.match(p.name))
    numbered = [n for n in names if n != "fold_all" and (results_folder / n / checkpoint).is_file()]
    if numbered:
        return [int(n.split("_")[1]) for n in numbered]
    if (results_folder / "fold_all" / checkpoint).is_file():
        return ["all"]
    present = ", ".join(names) or "none"
    raise NnsegError(f"No fold in {str(results_folder)!r} holds {checkpoint!r} (fold folders: {present}). "
                     "Choose another checkpoint (e.g. checkpoint_best.pth) or check the folder.")
