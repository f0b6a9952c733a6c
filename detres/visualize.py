"""Draws detections onto images for people to look at."""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def class_colour(label: int) -> tuple[int, int, int]:
    """A bright colour per class; neighbouring labels get distant hues (golden-ratio steps)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    class_names: list[str] | None = None, min_score: float = 0.0) -> Image.Image:
    """Returns a copy of ``image`` (H, W, 3 uint8 RGB) with boxes, names and scores drawn.

    Args:
        boxes: (D, 4) xyxy in the image's pixels.
        scores: (D,); detections below ``min_score`` are not drawn.
        labels: (D,) contiguous class indices, named through ``class_names``.
    """
    canvas = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    line = max(1, round(min(canvas.size) / 200))
    order = np.argsort(scores)  # draw the most confident last, on top
    for i in order:
        if scores[i] < min_score:
            continue
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        label = int(labels[i])
        colour = class_colour(label)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        name = class_names[label] if class_names and 0 <= label < len(class_names) else str(label)
        text = f"{name} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 2 if y1 - th - 2 >= 0 else y1  # inside the box when it touches the top
        draw.rectangle((x1, ty, x1 + tw + 2, ty + th + 2), fill=colour)
        draw.text((x1 + 1, ty), text, fill=(0, 0, 0), font=font)
    return canvas


def save_detections(path: str | Path, image: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                    labels: np.ndarray, class_names: list[str] | None = None,
                    min_score: float = 0.0) -> Path:
    """Draws and writes a PNG; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_detections(image, boxes, scores, labels, class_names, min_score).save(path, format="PNG")
    return path
