#!/usr/bin/env python
"""Detect objects in images, videos or a camera with a trained detector; draw them and write
the detections.

    python tools/infer.py [CONFIG] --weights W INPUT [...] --out DIR [key=value ...]
    python tools/infer.py [CONFIG] --weights W --webcam 0 --out DIR [--max-frames N]

Draws every image (boxes, class names and scores) as DIR/<name>.png, where <name> is the
image's path relative to the folder given (folders are searched recursively), or its file name
for an image given itself, suffix kept: imgs/a/1.jpg -> DIR/a/1.jpg.png, so a/1.jpg, b/1.jpg and
1.png never share a drawing. Two inputs that would (x/1.jpg and y/1.jpg given as files) are an
error before any work. Writes DIR/results.json: COCO results format (original pixels, the
training set's category ids) plus "file_name" (the image's path as found from the input given);
the image id is the image's position in the input list (folders sorted). With --gt
ANNOTATIONS.json the results carry that file's ids instead, so that tools/eval_det.py and
tools/analyze_det.py score them against it: each image is matched to its image by file name
(the last part of "file_name"; a name it lacks or holds twice is an error before any work),
each class to its category by name. An unreadable image is skipped with a warning and named at
the end; the run fails only if no image could be read. Without CONFIG the config stored in the
checkpoint is used; key=value overrides apply either way, e.g.
``model.roi_head.score_threshold=0.5`` or Appendix B's ``test.flip=true``. The detector runs in
its fast inference form (frozen BN folded, channels-last; ``test.fast_path=false`` runs it as
trained) and, on CPUs with native bf16 (AVX-512 BF16 or AMX), under bf16 autocast
(``test.cpu_amp=none`` for fp32).

A video file given as an input (.mp4, .avi, .mov, .mkv, .webm, ...; videos are not searched
for in folders) gives DIR/<stem>.mp4 (clip.avi -> DIR/clip.mp4), its frames with the
detections drawn, in H.264 when the installed OpenCV writes it (else mp4v, said in one line),
and DIR/<stem>.jsonl, one JSON line per frame: {"frame", "time" (seconds), "detections": [{
"category_id", "class", "bbox" [x, y, w, h] in the frame's pixels, "score"}]}. --webcam N reads
camera N into DIR/webcamN.mp4 / .jsonl until Ctrl-C or --max-frames. Frames per second are
printed at the end (reading, detecting, drawing and writing included).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tqdm import tqdm

from detres.cli import check_output_path, is_override, run_main, tool_parser
from detres.config import load_config
from detres.data.image_files import drawing_paths, list_images
from detres.data.images import DatasetError, read_image
from detres.engine.logging import write_json
from detres.tasks.detection.config import DetectionConfig
from detres.tasks.detection.predictor import Predictor, ids_in_annotations
from detres.video import VIDEO_SUFFIXES, annotate_video, output_paths
from detres.visualize import save_detections

logger = logging.getLogger("detres")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = tool_parser(__doc__)
    parser.add_argument("inputs", nargs="*", metavar="[CONFIG] IMAGE_OR_DIR_OR_VIDEO",
                        help="an optional YAML config, then image files, folders or video "
                             "files, and key=value overrides")
    parser.add_argument("--weights", required=True, help="detection checkpoint")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--min-score", type=float, default=0.5,
                        help="draw detections at or above this score (results.json keeps all)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--gt", type=Path, metavar="ANNOTATIONS.json",
                        help="COCO-format annotations whose image and category ids the results "
                             "carry (images matched by file name, classes by name)")
    parser.add_argument("--webcam", type=int, default=None, metavar="N",
                        help="read camera N (0 is the first) until Ctrl-C or --max-frames")
    parser.add_argument("--max-frames", type=int, default=None, metavar="N",
                        help="stop each video or camera after N frames")
    args = parser.parse_intermixed_args(argv)
    args.overrides = [a for a in args.inputs if is_override(a)]
    rest = [a for a in args.inputs if a not in args.overrides]
    args.config = rest.pop(0) if rest and rest[0].endswith((".yaml", ".yml")) else None
    args.videos = [a for a in rest if Path(a).suffix.lower() in VIDEO_SUFFIXES
                   and Path(a).is_file()]
    args.images = [a for a in rest if a not in args.videos]
    if not args.images and not args.videos and args.webcam is None:
        parser.error("no images, videos or --webcam given")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    out = check_output_path(args.out, folder=True)
    images = list_images(args.images, out) if args.images else []
    drawings = drawing_paths(images, out)
    videos = [(Path(v), Path(v).stem) for v in args.videos]
    if args.webcam is not None:
        videos.append((args.webcam, f"webcam{args.webcam}"))
    outputs = output_paths(videos, out)          # names unique, inside out: before any work
    cfg = load_config(args.config, schema=DetectionConfig) if args.config else None
    predictor = Predictor.from_checkpoint(args.weights, args.device, args.overrides,
                                          args.batch_size, cfg=cfg)
    image_ids = list(range(len(images)))
    if args.gt is not None:
        image_ids, predictor.category_ids = ids_in_annotations(
            [path for path, _ in images], args.gt, predictor.class_names)
    results = infer_images(args, predictor, images, drawings, image_ids) if images else []
    for (source, _), (video_out, jsonl_out) in zip(videos, outputs):
        stats = annotate_video(predictor, source, video_out, jsonl_out, args.min_score,
                               args.max_frames)
        print(f"{source if isinstance(source, Path) else f'camera {source}'}: {stats.frames} "
              f"frames, {stats.detections} detections, {stats.frames_per_second:.1f} frames/s "
              f"-> {video_out}, {jsonl_out}")
    return results


def infer_images(args: argparse.Namespace, predictor: Predictor,
                 images: list[tuple[Path, str]], drawings: list[Path],
                 image_ids: list[int]) -> list[dict]:
    """Draws and writes the detections of every image (``image_ids``: their ids in the
    results); returns the COCO results."""
    out = Path(args.out)
    results: list[dict] = []
    failed: list[Path] = []
    bar = tqdm(total=len(images), desc="infer", dynamic_ncols=True)
    for start in range(0, len(images), args.batch_size):
        chunk = []
        for k in range(start, min(start + args.batch_size, len(images))):
            try:
                chunk.append((k, read_image(images[k][0])))
            except DatasetError as e:   # missing, empty, truncated or corrupt: skip it
                logger.warning("skipping %s", e)
                failed.append(images[k][0])
        detections = predictor([image for _, image in chunk]) if chunk else []
        for (k, image), d in zip(chunk, detections):
            results.extend({**r, "file_name": str(images[k][0])}
                           for r in predictor.to_coco_results(d, image_ids[k]))
            save_detections(drawings[k], image, d.boxes.numpy(), d.scores.numpy(),
                            d.labels.numpy(), predictor.class_names, args.min_score)
        bar.update(min(args.batch_size, len(images) - start))
    bar.close()
    if len(failed) == len(images):
        raise DatasetError(f"none of the {len(images)} images could be read (first: {failed[0]})")
    write_json(out / "results.json", results, indent=None)
    if failed:
        logger.warning("%d of %d images could not be read and were skipped: %s", len(failed),
                       len(images), ", ".join(map(str, failed)))
    print(f"{len(images) - len(failed)} images, {len(results)} detections "
          f"({sum(r['score'] >= args.min_score for r in results)} drawn at score >= "
          f"{args.min_score}) -> {out}")
    return results


if __name__ == "__main__":
    run_main(main, extra_errors=(ValueError,))   # e.g. an image or a checkpoint it cannot use
