"""Datasets, transforms and loaders: files on disk -> (ImageBatch, list[Targets]).

See docs/architecture.md, Carriers for the data that flows and Datasets for the datasets.
"""
from detres.data.builtin import (SHAPE_CLASSES, default_cache_root, ensure_builtin_shapes,
                                 ensure_generated, render_shapes_image, shapes_split)
from detres.data.coco import COCODetection
from detres.data.detection_dataset import AnnotationIndex, DetectionDataset
from detres.data.images import DatasetError, ImageDecodeError, read_image
from detres.data.loader import build_detection_loader
from detres.data.samplers import InferenceSampler, TrainingSampler
from detres.data.transforms import (DetectionTransform, TransformOutput, eval_transform,
                                    resize_scale, train_transform)
from detres.data.voc import VOC_CLASSES, VOCDetection

__all__ = [
    "AnnotationIndex", "COCODetection", "DatasetError", "DetectionDataset", "DetectionTransform",
    "ImageDecodeError", "InferenceSampler", "SHAPE_CLASSES", "TrainingSampler",
    "TransformOutput", "VOCDetection", "VOC_CLASSES", "build_detection_loader",
    "default_cache_root", "ensure_builtin_shapes", "ensure_generated",
    "eval_transform", "read_image", "render_shapes_image", "resize_scale", "shapes_split",
    "train_transform",
]
