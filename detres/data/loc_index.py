"""The index of a localization split kept in a compact file, so that ImageNet's ~540k box XMLs
are parsed once rather than on every start and every rank (``LocalizationDataset``).

The file (``<cache_dir>/loc-<roots hash>.npz``, numpy arrays only, read without pickle) holds the
parsed index and a fingerprint of its source: the image and XML folders, the class list, the
indexing options, every image file name and every matched XML's path, size and modification
time. The fingerprint is recomputed from a listing of the folders (names and one ``stat`` per
XML, far cheaper than parsing) at each start; a different one (an XML edited, added or
removed, an image added, another option) re-indexes and rewrites the file. Writes are atomic,
so ranks that index at the same time each write a whole, identical file.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from detres.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

VERSION = 1  # bump when the stored arrays or their meaning change
ARRAYS = ("paths", "sizes", "offsets", "boxes", "labels", "xml_paths", "image_labels",
          "skipped_classes", "bad_annotations", "counts")


def cache_file(cache_dir: str | os.PathLike, image_root: Path, box_root: Path) -> Path:
    """Where the index of the split in ``image_root`` / ``box_root`` is kept."""
    key = f"{image_root.resolve()}\0{box_root.resolve()}".encode()
    return Path(cache_dir) / f"loc-{image_root.name}-{hashlib.sha1(key).hexdigest()[:12]}.npz"


def fingerprint(image_root: Path, box_root: Path, class_names: Iterable[str],
                options: dict[str, Any], listing: Iterable[tuple[str, str | None]]) -> str:
    """A hash of everything the index is made from; ``listing`` is (image path, XML path or
    None) for every image, in indexing order."""
    h = hashlib.sha256()
    for part in (f"v{VERSION}", str(image_root.resolve()), str(box_root.resolve()),
                 "\0".join(class_names), repr(sorted(options.items()))):
        h.update(part.encode() + b"\1")
    for image, xml in listing:
        if xml is None:
            h.update(f"{image}\0-\1".encode())
            continue
        st = os.stat(xml)
        h.update(f"{image}\0{xml}\0{st.st_size}\0{st.st_mtime_ns}\1".encode())
    return h.hexdigest()


def load_index(path: Path, expected: str) -> dict[str, np.ndarray] | None:
    """The stored arrays when ``path`` holds an index with fingerprint ``expected``, else
    None (absent, stale, or unreadable: then it is simply rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["fingerprint"]) != expected:
                logger.info("%s: the source changed; indexing again", path)
                return None
            return {k: f[k] for k in ARRAYS}
    except (OSError, ValueError, KeyError) as e:
        logger.warning("%s: unreadable index cache (%s); indexing again", path, e)
        return None


def save_index(path: Path, fp: str, arrays: dict[str, np.ndarray]) -> None:
    """Writes ``arrays`` (the keys of ``ARRAYS``) and the fingerprint atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, fingerprint=np.array(fp), **{k: arrays[k] for k in ARRAYS})
    try:
        atomic_write_bytes(path, lambda f: f.write(buffer.getvalue()))
    except OSError as e:   # a read-only place only costs the next start the parsing
        logger.warning("could not write the index cache %s: %s", path, e)
        return
    logger.info("wrote the index cache %s", path)
