"""Detection on video: frames from a file or a camera (OpenCV's ``VideoCapture``) go through a
``Predictor`` in batches; each frame is drawn into an annotated video (``VideoWriter``, an .mp4
file) and its detections written as one JSON line:

    {"frame": 0, "time": 0.0, "detections": [{"category_id": 3, "class": "car",
     "bbox": [x, y, w, h], "score": 0.93}, ...]}

``time`` is the frame's position in seconds at the source's frame rate; boxes are in the
frame's pixels (COCO's [x, y, w, h]). Lines are flushed as frames finish, so an interrupted
camera run keeps everything up to its last frame.

The video is H.264 (what browsers play) when the installed OpenCV can write it; the pip wheels
of OpenCV cannot (no H.264 encoder), and then it is MPEG-4 Part 2 (``mp4v``), said in one line.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from tqdm import tqdm

from detres.data.image_files import output_files
from detres.data.images import DatasetError
from detres.visualize import draw_detections

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}
DEFAULT_FPS = 30.0          # when the source does not tell (many cameras)
H264_FOURCCS = ("avc1", "H264")    # the MP4 tag first; some builds know H.264 by the other
FALLBACK_FOURCC = "mp4v"           # MPEG-4 Part 2: every OpenCV build writes it
logger = logging.getLogger("detres")


@dataclass
class VideoStats:
    frames: int
    detections: int
    seconds: float           # wall time of the whole loop: reading, detecting, drawing, writing

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else math.inf


def _cv2() -> ModuleType:
    try:
        import cv2
    except ImportError:
        raise DatasetError("video input needs OpenCV (cv2), which is missing from this "
                           "environment: pip install opencv-python-headless") from None
    return cv2


def open_capture(source: str | Path | int) -> Any:
    """An opened ``cv2.VideoCapture`` of a video file or a camera index."""
    cv2 = _cv2()
    if isinstance(source, int):
        capture = cv2.VideoCapture(source)
        if not capture.isOpened():
            raise DatasetError(f"camera {source} could not be opened (no such camera, or it "
                               f"is in use); cameras are numbered from 0")
        return capture
    if not Path(source).is_file():
        raise DatasetError(f"{source}: no such video file")
    capture = cv2.VideoCapture(str(source))
    if not capture.isOpened():
        raise DatasetError(f"{source}: cannot be read as a video (unknown format or codec)")
    return capture


def output_paths(sources: list[tuple[str | Path | int, str]], out: Path
                 ) -> list[tuple[Path, Path]]:
    """``(out/<name>.mp4, out/<name>.jsonl)`` for each ``(source, name)``
    (``data.image_files.output_files``)."""
    return output_files(sources, out, (".mp4", ".jsonl"))


@functools.cache
def video_fourcc() -> str:
    """The codec of the annotated videos: H.264 when this OpenCV writes it, else ``mp4v``
    with one warning (asked once per process)."""
    cv2 = _cv2()
    for code in H264_FOURCCS:
        if _encodes(cv2, code):
            return code
    logger.warning(f"this OpenCV build cannot write H.264, so the videos are MPEG-4 Part 2 "
                   f"({FALLBACK_FOURCC}), which most browsers do not play; re-encode them "
                   f"(ffmpeg -i in.mp4 -c:v libx264 out.mp4) or use an OpenCV built with H.264")
    return FALLBACK_FOURCC


def _encodes(cv2: ModuleType, code: str) -> bool:
    """Whether OpenCV writes ``code`` here: some builds open a writer for a codec they then
    fail to encode, so two frames are written and one read back."""
    with tempfile.TemporaryDirectory() as folder, _quiet_stderr():
        path = str(Path(folder) / "probe.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*code), DEFAULT_FPS, (64, 64))
        if not writer.isOpened():
            return False
        for _ in range(2):
            writer.write(np.zeros((64, 64, 3), np.uint8))
        writer.release()
        capture = cv2.VideoCapture(path)
        ok = capture.read()[0]
        capture.release()
    return bool(ok)


@contextlib.contextmanager
def _quiet_stderr():
    """FFmpeg and OpenCV report a codec they lack on file descriptor 2 itself, below Python:
    a probe that fails must not print several error lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def annotate_video(predictor: Any, source: str | Path | int, video_out: Path,
                   jsonl_out: Path, min_score: float = 0.5, max_frames: int | None = None,
                   progress: bool = True) -> VideoStats:
    """Detects objects in every frame of ``source`` (a file, or a camera index).

    Writes the frames with the detections at or above ``min_score`` drawn to ``video_out``
    (``video_fourcc()``'s codec at the source's frame rate) and every detection to
    ``jsonl_out``, one line per frame. Stops at the end of the video, after ``max_frames``,
    or on Ctrl-C (a camera runs until then), closing both files properly.
    """
    cv2 = _cv2()
    capture = open_capture(source)
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps if fps and math.isfinite(fps) and fps > 0 else DEFAULT_FPS
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) if not isinstance(source, int) else 0
    total = min(total, max_frames) if total > 0 and max_frames else (total or max_frames)
    video_out.parent.mkdir(parents=True, exist_ok=True)
    writer, frames, detections, start = None, 0, 0, time.perf_counter()
    bar = tqdm(total=total or None, desc=Path(str(source)).name, unit="frame",
               dynamic_ncols=True, disable=not progress)
    try:
        with open(jsonl_out, "w", encoding="utf-8") as lines:
            while max_frames is None or frames < max_frames:
                batch = _read_frames(capture, predictor.batch_size,
                                     None if max_frames is None else max_frames - frames)
                if not batch:
                    break
                if writer is None:
                    writer = _open_writer(cv2, video_out, fps, batch[0].shape)
                for rgb, found in zip(batch, predictor.predict(batch)):
                    detections += _write_frame(predictor, rgb, found, frames, fps, min_score,
                                               writer, lines)
                    frames += 1
                lines.flush()
                bar.update(len(batch))
    except KeyboardInterrupt:       # the way to end a camera run: keep what was written
        pass
    finally:
        bar.close()
        capture.release()
        if writer is not None:
            writer.release()
    if frames == 0:
        raise DatasetError(f"{source}: no frame could be read")
    return VideoStats(frames, detections, time.perf_counter() - start)


def _read_frames(capture: Any, count: int, left: int | None) -> list[np.ndarray]:
    """Up to ``count`` (and ``left``) next frames as (H, W, 3) uint8 RGB."""
    frames = []
    while len(frames) < (count if left is None else min(count, left)):
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(np.ascontiguousarray(bgr[:, :, ::-1]))
    return frames


def _open_writer(cv2: ModuleType, path: Path, fps: float, shape: tuple[int, ...]) -> Any:
    height, width = shape[:2]
    codes = list(dict.fromkeys((video_fourcc(), FALLBACK_FOURCC)))
    for code in codes:      # H.264 encoders refuse some frame sizes (odd ones) that mp4v takes
        with _quiet_stderr() if code != codes[-1] else contextlib.nullcontext():
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*code), fps,
                                     (width, height))
        if writer.isOpened():
            if code != codes[0]:
                logger.warning(f"{path}: {width}x{height} frames cannot be written as "
                               f"{codes[0]}; written as {code}")
            return writer
    raise DatasetError(f"{path}: OpenCV cannot write a video here ({' or '.join(codes)})")


def _write_frame(predictor: Any, rgb: np.ndarray, found: Any, index: int, fps: float,
                 min_score: float, writer: Any, lines: Any) -> int:
    """Draws one frame into ``writer`` and its JSON line into ``lines``; returns the number
    of detections."""
    results = [{"category_id": r["category_id"], "class": predictor.class_names[int(k)],
                "bbox": r["bbox"], "score": r["score"]}
               for r, k in zip(predictor.to_coco_results(found, index), found.labels.tolist())]
    lines.write(json.dumps({"frame": index, "time": round(index / fps, 4),
                            "detections": results}) + "\n")
    drawn = draw_detections(rgb, found.boxes.numpy(), found.scores.numpy(),
                            found.labels.numpy(), predictor.class_names, min_score)
    writer.write(np.ascontiguousarray(np.asarray(drawn)[:, :, ::-1]))
    return len(results)
