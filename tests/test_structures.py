import pytest
import torch

from detres.structures import Detections, DetectorOutput, ImageBatch, Targets, pad_images


def test_image_batch_pads_to_multiple_of_32_and_keeps_sizes():
    a = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    b = torch.randint(0, 256, (3, 64, 33), dtype=torch.uint8)
    batch = ImageBatch.from_tensors([a, b])
    assert batch.tensor.shape == (2, 3, 64, 96) and batch.tensor.dtype == torch.float32
    assert batch.sizes == [(50, 70), (64, 33)]
    torch.testing.assert_close(batch.tensor[0, :, :50, :70], a.float())
    torch.testing.assert_close(batch.tensor[1, :, :64, :33], b.float())
    assert batch.tensor[0, :, 50:].abs().sum() == 0 and batch.tensor[0, :, :, 70:].abs().sum() == 0
    assert batch.tensor[1, :, :, 33:].abs().sum() == 0
    assert len(batch) == 2 and batch.to("cpu").sizes == batch.sizes


def test_pad_images_keeps_the_dtype_asked_for():
    a = torch.full((3, 5, 9), 200, dtype=torch.uint8)
    batch, sizes = pad_images([a], size_divisibility=8, dtype=torch.uint8)
    assert batch.dtype == torch.uint8 and batch.shape == (1, 3, 8, 16) and sizes == [(5, 9)]
    assert batch[0, :, :5, :9].eq(200).all() and batch.sum() == 200 * a.numel()


def test_image_batch_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        ImageBatch(torch.zeros(2, 1, 32, 32), [(32, 32)] * 2)
    with pytest.raises(ValueError, match="2 images but 1 sizes"):
        ImageBatch(torch.zeros(2, 3, 32, 32), [(32, 32)])
    with pytest.raises(ValueError, match="at least one image"):
        ImageBatch.from_tensors([])


def test_targets_and_detections_validate_shapes():
    t = Targets(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64), image_id=7, scale=2.0,
                orig_size=(10, 20))
    assert len(t) == 3 and t.to("cpu").image_id == 7
    with pytest.raises(ValueError, match="image_id=9"):
        Targets(torch.zeros(3, 4), torch.zeros(2, dtype=torch.int64), image_id=9)
    with pytest.raises(ValueError, match=r"image_id=9\).boxes must be \(M, 4\)"):
        Targets(torch.zeros(3, 5), torch.zeros(3, dtype=torch.int64), image_id=9)
    d = Detections.empty()
    assert len(d) == 0 and d.labels.dtype == torch.int64
    with pytest.raises(ValueError, match="Detections need"):
        Detections(torch.zeros(2, 4), torch.zeros(3), torch.zeros(2, dtype=torch.int64))


def test_detector_output_defaults_are_not_shared():
    a, b = DetectorOutput(), DetectorOutput()
    a.losses["x"] = torch.tensor(1.0)
    assert b.losses == {} and a.detections is None
