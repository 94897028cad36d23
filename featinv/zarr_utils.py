"""Small Zarr v3 helpers shared by the image and feature stores.

Stores are written under ``<path>.partial`` and moved into place only when
complete (:func:`commit_dir`), so a killed run never leaves a store that looks
finished.  Fingerprints are SHA-256 digests of canonical JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import zarr
from zarr.codecs import BloscCodec, BloscShuffle

__all__ = ["CODECS", "compressors_for", "partial_path", "commit_dir", "digest", "remove_tree"]

CODECS = ("zstd", "lz4", "none")


def compressors_for(codec: str, clevel: int = 1, typesize: int = 2) -> tuple | None:
    """Zarr v3 compressor chain for ``codec`` (blosc with byte shuffle), or None.

    Raises:
        ParamsError: unknown codec name.
    """
    from featinv.errors import ParamsError

    if codec == "none":
        return None
    if codec not in CODECS:
        raise ParamsError(f"unknown codec {codec!r} (param `extract.codec`); choices: {', '.join(CODECS)}")
    return (BloscCodec(cname=codec, clevel=clevel, shuffle=BloscShuffle.shuffle, typesize=typesize),)


def partial_path(path: Path) -> Path:
    """Where a store is built before it is committed."""
    return path.with_name(path.name + ".partial")


def commit_dir(partial: Path, final: Path) -> None:
    """Atomically move a finished store directory into place (replacing an old one).

    The old store is renamed aside first and deleted only after the new one is in place: deleting
    it in place could fail half-way (disk error, a kill) and leave a half-deleted store that
    still carries its ``complete`` attribute.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    old = final.with_name(final.name + ".old")
    remove_tree(old)
    if final.exists() or final.is_symlink():
        os.replace(final, old)
    os.replace(partial, final)
    remove_tree(old)


def remove_tree(path: Path) -> None:
    """Remove a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def digest(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def open_group(path: Path, mode: str = "r") -> zarr.Group:
    """Open a Zarr v3 group (thin wrapper so the format is chosen in one place)."""
    return zarr.open_group(str(path), mode=mode, zarr_format=3)
