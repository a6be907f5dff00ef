"""Extracting model zips without trusting their member names.

A zip from the internet can name members like ``../../.bashrc`` or absolute paths, or hold links; none of
those may land outside the target folder, and a partial extraction must never look complete.
"""

from __future__ import annotations

import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from .errors import NnsegError

_MAX_TOTAL_BYTES = 64 * 1024**3  # refuse zip bombs that claim more than any real model needs


def _check_member(info: zipfile.ZipInfo, zip_path: Path) -> None:
    name = info.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (parts and parts[0].endswith(":")) or ".." in parts:
        raise NnsegError(f"Refusing to extract {str(zip_path)!r}: member {info.filename!r} points outside "
                         "the archive folder. The zip is damaged or malicious; export the model again.")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise NnsegError(f"Refusing to extract {str(zip_path)!r}: member {info.filename!r} is a symbolic "
                         "link. Model zips hold plain files only.")


def extract_zip_safely(zip_path: Path, target: Path) -> None:
    """Extract to a temporary sibling folder, then rename, so ``target`` is either complete or absent."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as exc:
        raise NnsegError(f"{str(zip_path)!r} is not a valid zip file ({exc}).") from exc
    with zf:
        infos = zf.infolist()
        total = 0
        for info in infos:
            _check_member(info, zip_path)
            total += info.file_size
        if total > _MAX_TOTAL_BYTES:
            raise NnsegError(f"Refusing to extract {str(zip_path)!r}: it claims {total / 1e9:.1f} GB.")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
        try:
            root = tmp.resolve()
            for info in infos:
                dest = (tmp / info.filename).resolve()
                if root not in dest.parents and dest != root:
                    raise NnsegError(f"Refusing to extract member {info.filename!r} of {str(zip_path)!r}.")
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
