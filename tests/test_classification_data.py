"""Classification data: ImageFolder and its bad inputs, CIFAR-10 batches, the paper's
augmentation recipes, 10-crop, the loader's sampler seeds, the built-in set."""
import itertools
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from detres.data import builtin_cls
from detres.data.classification import (Cifar10, ClassificationDataset, DatasetNotFoundError,
                                        ImageFolder, build_cls_transform, collate,
                                        ten_crop)
from detres.data.loader import make_loader
from detres.data.images import DatasetError, ImageDecodeError
from detres.data.samplers import InferenceSampler, TrainingSampler


def write_folder(root, classes=("a", "b"), per_class=3, size=(12, 10)):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((size[1], size[0], 3), 40 * c + i, np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_image_folder_lists_sorted_classes(tmp_path):
    ds = ImageFolder(write_folder(tmp_path / "train", classes=("zebra", "ant")))
    assert ds.class_names == ["ant", "zebra"] and len(ds) == 6
    image, label = ds[4]
    assert image.shape == (3, 10, 12) and image.dtype == torch.uint8 and label == 1


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    root = write_folder(tmp_path / "train")
    (root / "a" / "0.png").write_bytes(b"not an image")
    good = (root / "b" / "0.png").read_bytes()
    (root / "b" / "1.png").write_bytes(good[: len(good) // 2])
    ds = ImageFolder(root)
    with pytest.raises(ImageDecodeError, match=r"a/0\.png.*skip_bad_images"):
        ds[0]
    with pytest.raises(ImageDecodeError, match=r"b/1\.png"):
        ds[4]


def test_skip_bad_images_replaces_and_counts(tmp_path, caplog):
    root = write_folder(tmp_path / "train")
    (root / "a" / "1.png").write_bytes(b"garbage")
    (root / "b" / "2.png").write_bytes(b"")
    ds = ImageFolder(root, skip_bad_images=True)
    labels = [ds[i][1] for i in range(len(ds))]
    assert labels == [0, 0, 0, 1, 1, 0]          # 1.png -> 2.png; b/2.png wraps to a/0.png
    assert ds.report_skipped_images() == 2
    assert "skipped 2 of 6" in caplog.text


def test_empty_class_folder_no_classes_and_missing_root(tmp_path):
    root = write_folder(tmp_path / "train")
    (root / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty.*holds no images"):
        ImageFolder(root)
    (tmp_path / "bare").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        ImageFolder(tmp_path / "bare")
    with pytest.raises(DatasetNotFoundError, match=r"looked for .*nowhere\. get it there"):
        ImageFolder(tmp_path / "nowhere", hint="get it there")


def write_cifar(root, n=4):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": list(range(n))}
        (root / name).write_bytes(pickle.dumps(batch))
    return root


def test_cifar10_reads_local_batches(tmp_path):
    root = write_cifar(tmp_path / "cifar-10-batches-py")
    train, test = Cifar10(root, "train"), Cifar10(root, "val")
    assert len(train) == 20 and len(test) == 4 and train.class_names[0] == "airplane"
    image, label = train[1]
    assert image.shape == (3, 32, 32) and label == 1
    assert train.mean_image().shape == (3, 32, 32)


def test_cifar10_missing_says_where_and_what_to_run(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        Cifar10(tmp_path / "cifar-10-batches-py", "train")
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "cifar-10-python.tar.gz" in msg
    assert "configs/cls_builtin.yaml" in msg


def test_cifar10_refuses_pickled_code(tmp_path):
    root = write_cifar(tmp_path / "c")

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (root / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        Cifar10(root, "test")


def test_imagenet_recipe_shapes_and_per_sample_seeds():
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    train = build_cls_transform("imagenet", True, 224)
    assert train(image, seed=1).shape == (3, 224, 224)
    assert torch.equal(train(image, seed=7), train(image, seed=7))
    assert not torch.equal(train(image, seed=7), train(image, seed=8))
    test = build_cls_transform("imagenet", False, 224, test_size=256)
    center = test(image)
    assert center.shape == (3, 224, 224)
    # shorter side 300 -> 256 (256 x 341), then the centre 224 crop
    assert build_cls_transform("imagenet", False, 224, ten_crop=True)(image).shape == \
        (10, 3, 224, 224)


def test_cifar_recipe_pads_crops_flips():
    image = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    train = build_cls_transform("cifar", True, 32, pad_fill=(9, 9, 9))
    outs = [train(image, seed=s) for s in range(20)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any((o == 9).all(dim=0).any() for o in outs)             # some padding shows
    assert torch.equal(build_cls_transform("cifar", False, 32)(image),
                       torch.from_numpy(image.transpose(2, 0, 1).copy()))  # the original view


def test_ten_crop_corners_centre_and_flips():
    image = np.arange(4 * 4, dtype=np.uint8).reshape(4, 4, 1)
    crops = ten_crop(image, 2)[..., 0]
    assert crops.shape == (10, 2, 2)
    np.testing.assert_array_equal(crops[0], [[0, 1], [4, 5]])       # top-left
    np.testing.assert_array_equal(crops[3], [[10, 11], [14, 15]])   # bottom-right
    np.testing.assert_array_equal(crops[4], [[5, 6], [9, 10]])      # centre
    np.testing.assert_array_equal(crops[5], [[1, 0], [5, 4]])       # top-left, flipped


class Textured(ClassificationDataset):
    """10 random 8x8 images (so crops and flips show), label = index."""

    class_names = [str(i) for i in range(10)]
    labels = np.arange(10)

    def read(self, i: int) -> tuple[np.ndarray, int]:
        return np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8), i


def test_loader_feeds_sampler_seeds_to_the_augmentation():
    """Items are ``(index, seed)``: a sample's crop and flip follow its stream position, so
    every rank count and every resume sees the same images."""
    data = Textured(build_cls_transform("cifar", True, 8))
    sampler = TrainingSampler(len(data), 4, seed=3)
    loader = make_loader(data, collate_fn=collate, batch_sampler=sampler)
    first = [images for images, _ in itertools.islice(iter(loader), 3)]
    sampler.load_state_dict({"next_batch": 2})
    again = next(iter(make_loader(data, collate_fn=collate, batch_sampler=sampler)))[0]
    assert torch.equal(again, first[2])
    halves = [next(iter(make_loader(data, collate_fn=collate, batch_sampler=TrainingSampler(
        len(data), 4, seed=3, rank=r, world_size=2))))[0] for r in range(2)]
    assert torch.equal(torch.cat(halves), first[0])
    test = make_loader(data, collate_fn=collate, sampler=InferenceSampler(len(data), 1, 2),
                       batch_size=2)
    assert torch.cat([labels for _, labels in test]).tolist() == data.labels[5:].tolist()


def test_builtin_set_is_deterministic_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin_cls, "SPLIT_SIZES", {"train": 2, "val": 1})
    monkeypatch.setenv("DETRES_CACHE", str(tmp_path))
    root = builtin_cls.ensure_builtin_cls()
    assert root == tmp_path / f"builtin_cls_{builtin_cls.VERSION}"
    assert [p.name for p in tmp_path.iterdir()] == [root.name]       # no temporary left
    ds = ImageFolder(root / "train")
    assert ds.class_names == sorted(builtin_cls.CLASS_NAMES) and len(ds) == 20
    np.testing.assert_array_equal(builtin_cls.render(3, 42), builtin_cls.render(3, 42))
    stamp = (root / "val" / "disk" / "0000.png").stat().st_mtime_ns
    assert builtin_cls.ensure_builtin_cls() == root                 # reused, not regenerated
    assert (root / "val" / "disk" / "0000.png").stat().st_mtime_ns == stamp
