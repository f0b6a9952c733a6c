"""Classification data: ImageFolder (ImageNet layout), CIFAR-10 (local python batches), the
paper's augmentation recipes, and the loader (its samplers are in ``detres.data.samplers``).

``dataset[(index, seed)]`` returns ``(image, label)``: image (3, H, W) uint8 RGB after the
transform ((10, 3, H, W) with 10-crop testing), label an int in [0, K). The ``seed`` makes
a sample's augmentation a function of its position in the sample stream, not of the worker
that happens to load it, so a resumed run sees exactly the images an uninterrupted run sees.

Recipes (He et al. 2015):
- imagenet (Sec 3.4): shorter side drawn from [256, 480], random 224 crop, horizontal flip,
  mean subtraction, AlexNet's PCA colour augmentation; test: shorter side 256, centre 224
  crop, or the standard 10-crop (4 corners + centre, and their flips), or the fully-
  convolutional multi-scale form (the whole image at several shorter sides, scores averaged).
- cifar (Sec 4.2): pad 4 pixels on each side, random 32 crop, flip; test: the original image.
- builtin: the cifar recipe at the built-in set's size.
"""
from __future__ import annotations

import logging
import os
import pickle
import random
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from detres.data.detection_dataset import BadImageSkipper
from detres.data.images import DatasetError, ImageDecodeError, image_to_tensor, read_image
from detres.data.transforms import resize, resize_scale
from detres.safe_pickle import RefusedPickleError, load_arrays

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
BUILTIN_HINT = "python tools/pretrain_cls.py configs/cls_builtin.yaml (built-in data, no download)"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder is absent: the message says where it looked and how to get the data."""


def datasets_root() -> Path:
    """``$DETRES_DATASETS`` or ``./datasets`` (docs/architecture.md, Datasets)."""
    return Path(os.environ.get("DETRES_DATASETS") or "datasets")


# ----------------------------------------------------------------------------- datasets
class ClassificationDataset(Dataset):
    """Base: subclasses provide ``class_names``, ``labels`` (N,) int64 and ``read(i)``."""

    class_names: list[str]
    labels: np.ndarray

    def __init__(self, transform: ClsTransform | None = None) -> None:
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def read(self, i: int) -> tuple[np.ndarray, int]:
        """(image (H, W, 3) uint8 RGB, label) of item i (or of its stand-in, see ImageFolder)."""
        raise NotImplementedError

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor, int]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        image, label = self.read(int(index))
        if self.transform is not None:
            return self.transform(image, seed), label
        return image_to_tensor(image), label


class ImageFolder(ClassificationDataset):
    """``root/<class>/<image>`` (ImageNet's train/val layout); classes sorted by folder name.

    Args:
        root: the folder holding one sub-folder per class.
        skip_bad_images: an undecodable file is logged, counted and replaced by the next good
            image instead of raising; ``report_skipped_images()`` gives the count at the end.
        hint: appended to the "not found" error (how to get the data).
    """

    def __init__(self, root: str | Path, transform: ClsTransform | None = None, *,
                 skip_bad_images: bool = False, hint: str = "") -> None:
        super().__init__(transform)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"image folder not found: looked for {self.root.resolve()}"
                                       + (f". {hint}" if hint else ""))
        self.class_names = sorted(d.name for d in os.scandir(self.root) if d.is_dir())
        if not self.class_names:
            raise DatasetError(f"{self.root}: no class folders; an ImageFolder dataset needs "
                               f"one sub-folder per class (root/<class>/<image>)")
        paths, labels = [], []
        for label, name in enumerate(self.class_names):
            files = sorted(e.path for e in os.scandir(self.root / name)
                           if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                raise DatasetError(f"{self.root / name}: class folder '{name}' holds no images "
                                   f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove it")
            paths += files
            labels += [label] * len(files)
        # numpy arrays, not lists of str: forked DataLoader workers then share the pages.
        self.paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.skip_bad_images = skip_bad_images
        self.skipper = BadImageSkipper(len(paths), skip_bad_images, str(self.root), self.path,
                                       errors=(ImageDecodeError,),
                                       hint="set data.skip_bad_images=true to skip "
                                            "undecodable images")

    def path(self, i: int) -> Path:
        return Path(os.fsdecode(bytes(self.paths[i])))

    def read(self, i: int) -> tuple[np.ndarray, int]:
        image, j = self.skipper.read(i, lambda k: read_image(self.path(k)))
        return image, int(self.labels[j])

    @property
    def num_skipped_images(self) -> int:
        return self.skipper.count

    def report_skipped_images(self) -> int:
        """Logs how many (and which) images were skipped as undecodable; returns the count."""
        return self.skipper.report()


class CifarBatchError(DatasetError, pickle.UnpicklingError):
    """A CIFAR batch that is not a plain pickle of numbers; nothing of it was run."""


def _read_cifar_batch(path: Path) -> dict:
    """CIFAR's python batches are Python 2 pickles: read with the reader that builds only
    numeric arrays (``detres.safe_pickle``); ``encoding="bytes"`` keeps the keys ``b"data"``."""
    try:
        with open(path, "rb") as f:
            batch = load_arrays(f, encoding="bytes")
    except RefusedPickleError as e:
        raise CifarBatchError(f"{path}: refusing this CIFAR batch: {e}") from None
    except Exception as e:  # truncated, not a pickle, nested too deep
        raise CifarBatchError(f"{path}: refusing this CIFAR batch, not a readable pickle "
                              f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
                              ) from None
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not (isinstance(data, np.ndarray) and data.ndim == 2 and data.shape[1] == 3 * 32 * 32
            and isinstance(labels, list) and len(labels) == len(data)):
        raise CifarBatchError(f"{path}: refusing this CIFAR batch: expected a dict with b'data' "
                              f"(N, 3072) and N b'labels'")
    return batch


class Cifar10(ClassificationDataset):
    """CIFAR-10 from its python batches (``cifar-10-batches-py``; no download).

    ``split="train"`` reads ``data_batch_1..5`` (50k images), ``"val"``/``"test"`` reads
    ``test_batch`` (10k), the test set of the paper's Table 6.
    """

    def __init__(self, root: str | Path, split: str = "train",
                 transform: ClsTransform | None = None) -> None:
        super().__init__(transform)
        self.root = Path(root)
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        if split not in ("train", "val", "test"):
            raise ValueError(f"CIFAR-10 split must be train, val or test; got {split!r}")
        missing = [n for n in names if not (self.root / n).is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"CIFAR-10 not found: looked for {', '.join(missing)} in {self.root.resolve()}. "
                f"Download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it "
                f"into {datasets_root().resolve()} (it creates cifar-10-batches-py/), or set "
                f"DETRES_DATASETS or data.{split}.root. Without it, run {BUILTIN_HINT}")
        batches = [_read_cifar_batch(self.root / n) for n in names]
        data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
        self.images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()   # (N, 32, 32, 3)
        self.labels = np.concatenate([np.asarray(b[b"labels"], dtype=np.int64) for b in batches])
        self.class_names = list(CIFAR10_CLASSES)

    def read(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])

    def mean_image(self) -> np.ndarray:
        """(3, 32, 32) float32 per-pixel mean of the split (subtracted in Sec 4.2)."""
        return self.images.mean(axis=0, dtype=np.float64).transpose(2, 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------- transforms
class ClsTransform:
    """An albumentations pipeline, re-seeded per sample; optional 10-crop at the end."""

    def __init__(self, ops: Sequence[A.BasicTransform], ten_crop_size: int | None = None) -> None:
        self.compose = A.Compose(list(ops))
        self.ten_crop_size = ten_crop_size

    def __call__(self, image: np.ndarray, seed: int | None = None) -> Tensor:
        if seed is not None:  # one shared generator, so flip and crop draws are independent
            self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
        image = self.compose(image=image)["image"]
        if self.ten_crop_size is not None:
            crops = ten_crop(image, self.ten_crop_size)
            return torch.from_numpy(np.ascontiguousarray(crops.transpose(0, 3, 1, 2)))
        return image_to_tensor(image)


class MultiScaleTransform:
    """Fully-convolutional multi-scale testing (Sec. 3.4, as VGG's dense evaluation): the whole
    image with its shorter side at each of ``scales`` (the paper: 224, 256, 384, 480, 640),
    ``image -> list of (3, h, w) uint8``; the classifier's softmax scores are averaged over
    them (``models.classifier.mean_softmax``)."""

    def __init__(self, scales: Sequence[int]) -> None:
        if not scales or min(scales) <= 0:
            raise ValueError(f"multi-scale testing needs positive shorter sides, got {scales!r}")
        self.scales = tuple(int(s) for s in scales)

    def __call__(self, image: np.ndarray, seed: int | None = None) -> list[Tensor]:
        return [image_to_tensor(resize_shorter(image, s)) for s in self.scales]


def resize_shorter(image: np.ndarray, short_side: int) -> np.ndarray:
    """The image with its shorter side at ``short_side`` (``detres.data.transforms.resize``)."""
    scale = resize_scale(image.shape[0], image.shape[1], short_side, None)
    return resize(image, np.zeros((0, 4), np.float32), scale)[0]


def ten_crop(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) -> (10, size, size, 3): 4 corners and centre, then the same flipped."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"10-crop of {size} needs an image of at least {size}x{size}, got {w}x{h}")
    tops = (0, 0, h - size, h - size, (h - size) // 2)
    lefts = (0, w - size, 0, w - size, (w - size) // 2)
    crops = np.stack([image[t:t + size, l:l + size] for t, l in zip(tops, lefts)])
    return np.concatenate([crops, crops[:, :, ::-1]])


def build_cls_transform(recipe: str, train: bool, crop_size: int,
                        scale_range: tuple[int, int] = (256, 480), test_size: int = 256,
                        ten_crop: bool = False, pad_fill: Sequence[int] = (0, 0, 0),
                        test_scales: Sequence[int] = ()) -> ClsTransform | MultiScaleTransform:
    """The paper's train/test pipeline for ``recipe`` ("imagenet", "cifar", "builtin"); a test
    pipeline with ``test_scales`` is the multi-scale fully-convolutional one, any recipe."""
    fill = tuple(int(v) for v in pad_fill)
    if test_scales and not train:
        return MultiScaleTransform(test_scales)
    if recipe == "imagenet":
        if train:
            lo, hi = scale_range
            return ClsTransform([A.SmallestMaxSize(max_size=list(range(lo, hi + 1))),
                                 A.RandomCrop(crop_size, crop_size), A.HorizontalFlip(),
                                 A.FancyPCA(alpha=0.1, p=1.0)])
        ops = [A.SmallestMaxSize(max_size=test_size)]
        if ten_crop:
            return ClsTransform(ops, ten_crop_size=crop_size)
        return ClsTransform(ops + [A.CenterCrop(crop_size, crop_size)])
    if recipe in ("cifar", "builtin"):
        # Pad with the mean colour, which is zero after mean subtraction as in the paper.
        pad = A.PadIfNeeded(crop_size + 8, crop_size + 8, border_mode=cv2.BORDER_CONSTANT,
                            fill=fill)
        if train:
            return ClsTransform([pad, A.RandomCrop(crop_size, crop_size), A.HorizontalFlip()])
        if ten_crop:
            return ClsTransform([pad], ten_crop_size=crop_size)
        return ClsTransform([A.CenterCrop(crop_size, crop_size)])   # the original 32x32 view
    raise ValueError(f"unknown recipe {recipe!r}; valid: imagenet, cifar, builtin")


# ----------------------------------------------------------------------------- sampling
def collate(batch: list[tuple[Tensor | list[Tensor], int]]
            ) -> tuple[Tensor | list[list[Tensor]], Tensor]:
    """-> images (N, 3, H, W) (or (N, 10, 3, H, W)) uint8, or per image its list of views of
    different sizes (multi-scale testing); labels (N,) int64."""
    labels = torch.tensor([b[1] for b in batch])
    if isinstance(batch[0][0], list):
        return [b[0] for b in batch], labels
    return torch.stack([b[0] for b in batch]), labels
