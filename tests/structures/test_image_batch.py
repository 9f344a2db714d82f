"""ImageBatch.from_tensors: padding, sizes and device moves."""

import pytest
import torch

from detkit.structures import ImageBatch


def test_from_tensors_pads_bottom_right_to_a_multiple_of_32():
    a = torch.randint(1, 256, (3, 50, 70), dtype=torch.uint8)
    b = torch.randint(1, 256, (3, 65, 40), dtype=torch.uint8)
    batch = ImageBatch.from_tensors([a, b], size_divisibility=32)
    assert batch.tensor.shape == (2, 3, 96, 96)  # max (65, 70) rounded up to 32
    assert batch.tensor.dtype == torch.uint8
    assert len(batch) == 2
    assert batch.image_sizes.tolist() == [[50, 70], [65, 40]]
    assert batch.image_sizes.dtype == torch.int64
    assert batch.original_sizes.tolist() == [[50, 70], [65, 40]]  # default: the images' own sizes
    assert torch.equal(batch.tensor[0, :, :50, :70], a)
    assert torch.equal(batch.tensor[1, :, :65, :40], b)
    # Everything outside an image is zero padding.
    assert batch.tensor[0, :, 50:].eq(0).all() and batch.tensor[0, :, :, 70:].eq(0).all()
    assert batch.tensor[1, :, 65:].eq(0).all() and batch.tensor[1, :, :, 40:].eq(0).all()


def test_from_tensors_without_divisibility_pads_to_the_largest_image():
    images = [torch.ones(3, 10, 20), torch.ones(3, 15, 5)]
    batch = ImageBatch.from_tensors(images, size_divisibility=1)
    assert batch.tensor.shape == (2, 3, 15, 20)
    assert batch.tensor.dtype == torch.float32
    # An image that is already a multiple is not padded further.
    assert ImageBatch.from_tensors([torch.ones(3, 64, 32)], size_divisibility=32).tensor.shape == (1, 3, 64, 32)


def test_from_tensors_keeps_given_original_sizes():
    batch = ImageBatch.from_tensors(
        [torch.zeros(3, 40, 60), torch.zeros(3, 30, 30)], original_sizes=[(80, 120), (300, 300)]
    )
    assert batch.original_sizes.tolist() == [[80, 120], [300, 300]]
    assert batch.original_sizes.dtype == torch.int64
    assert batch.image_sizes.tolist() == [[40, 60], [30, 30]]


def test_from_tensors_rejects_bad_inputs():
    with pytest.raises(ValueError, match="at least one image"):
        ImageBatch.from_tensors([])
    with pytest.raises(ValueError, match=r"image 1 must be a \(3, H, W\)"):
        ImageBatch.from_tensors([torch.zeros(3, 8, 8), torch.zeros(1, 8, 8)])


def test_to_moves_all_three_tensors():
    batch = ImageBatch.from_tensors([torch.zeros(3, 8, 8, dtype=torch.uint8)])
    moved = batch.to("cpu")
    assert moved.device == torch.device("cpu")
    assert torch.equal(moved.tensor, batch.tensor)
    assert torch.equal(moved.image_sizes, batch.image_sizes) and torch.equal(moved.original_sizes, batch.original_sizes)


def test_pin_memory_pins_all_three_tensors(monkeypatch):
    # Pinning needs a CUDA driver; what matters here is that all three tensors are pinned, so record
    # the calls (on a GPU machine the real pin_memory runs the same code path).
    pinned_ids = []

    def fake_pin(self):
        pinned_ids.append(id(self))
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = ImageBatch.from_tensors([torch.zeros(3, 8, 8, dtype=torch.uint8)])
    pinned = batch.pin_memory()
    assert sorted(pinned_ids) == sorted(map(id, (batch.tensor, batch.image_sizes, batch.original_sizes)))
    assert torch.equal(pinned.tensor, batch.tensor) and torch.equal(pinned.image_sizes, batch.image_sizes)
