"""Image files given on a command line (tools/infer.py, tools/infer_loc.py): folders searched
recursively, and where each image's drawing goes under the output folder."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from detres.data.io import DatasetError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(paths: Sequence[str | os.PathLike], out: Path) -> list[tuple[Path, str]]:
    """(file, name) of every image: a folder's images (recursively, sorted, none under ``out``)
    named by their path relative to it, an image file by its file name."""
    files: list[tuple[Path, str]] = []
    out_root = out.resolve()
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                           and f.is_file() and not f.resolve().is_relative_to(out_root))
            if not found:
                raise DatasetError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
            files.extend((f, f.relative_to(p).as_posix()) for f in found)
        elif p.is_file():
            files.append((p, p.name))
        else:
            raise DatasetError(f"{p}: no such image file or folder")
    return files


def drawing_paths(images: Sequence[tuple[Path, str]], out: Path) -> list[Path]:
    """``out/<name>.png`` for each image; an error if two images share a name or a drawing
    would land outside ``out`` (through a symbolic link in it)."""
    root, first_of, drawings = out.resolve(), {}, []
    for path, name in images:
        drawing = out / f"{name}.png"
        if name in first_of:
            raise DatasetError(f"{first_of[name]} and {path} would both be drawn as {drawing}; "
                               "give their common folder instead, or run them separately")
        if not drawing.resolve().is_relative_to(root):
            raise DatasetError(f"{path}: its drawing {drawing} would be written outside --out "
                               f"{out} (to {drawing.resolve()})")
        first_of[name] = path
        drawings.append(drawing)
    return drawings
