"""The device JPEG loader against PIL on files in the real ImageNet folder layout."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from prunekit.data import DATASET_STATS, DataError
from prunekit.jpeg import DeviceJpegLoader, center_crop_box, random_resized_crop_box


@pytest.fixture
def jpeg_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog", "eel")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, (30 + 4 * i, 40, 3), dtype=np.uint8)
                pixels[..., c] = 255
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "val" / "eel" / "p.png")
    return tmp_path


def test_evaluation_batches_equal_pil_decoding_with_the_same_crop(jpeg_folder):
    loader = DeviceJpegLoader(jpeg_folder, "val", 5, train=False, num_workers=0, size=16)
    assert loader.num_classes == 3 and len(loader) == 3
    x, y = next(iter(loader))
    assert x.shape == (5, 3, 16, 16) and y.tolist() == [0, 0, 0, 0, 1]
    path = loader.dataset.samples[1][0]
    image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    top, left, h, w = center_crop_box(*image.shape[1:], crop=16)
    crop = F.interpolate(image[None, :, top:top + h, left:left + w].float(), size=(16, 16), mode="bilinear",
                         align_corners=False, antialias=True)
    mean, std = DATASET_STATS["imagenet"]
    expected = (crop - torch.tensor(mean).view(1, 3, 1, 1) * 255) / (torch.tensor(std).view(1, 3, 1, 1) * 255)
    torch.testing.assert_close(x[1:2], expected, atol=0.05, rtol=0)  # decoders may differ by a grey level
    assert sum(len(b[1]) for b in loader) == 13  # the PNG too


def test_training_crops_replay_per_epoch_and_the_subset_spans_classes(jpeg_folder):
    def first(epoch):
        loader = DeviceJpegLoader(jpeg_folder, "train", 4, train=True, num_workers=0, size=8, seed=3, subset=6)
        loader.set_epoch(epoch)
        return next(iter(loader))

    (a, ya), (b, yb), (c, _) = first(0), first(0), first(1)
    assert torch.equal(a, b) and torch.equal(ya, yb) and not torch.equal(a, c)
    loader = DeviceJpegLoader(jpeg_folder, "train", 4, train=True, num_workers=0, subset=6, seed=3)
    assert len({label for _, label in loader.dataset.samples}) > 1
    box = random_resized_crop_box(30, 40, torch.Generator().manual_seed(0))
    assert 0 < box[2] <= 30 and 0 < box[3] <= 40


def test_a_corrupt_jpeg_is_one_line_naming_the_file(jpeg_folder):
    bad = jpeg_folder / "val" / "dog" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:60])
    loader = DeviceJpegLoader(jpeg_folder, "val", 8, train=False, num_workers=0)
    with pytest.raises(DataError) as error:
        list(loader)
    assert str(bad) in str(error.value) and "\n" not in str(error.value)


def test_the_device_loader_draws_the_same_subset_as_the_pil_loader(jpeg_folder):
    from prunekit.data import ImageFolderLoader

    device = DeviceJpegLoader(jpeg_folder, "train", 4, train=True, num_workers=0, subset=5, seed=7)
    pil = ImageFolderLoader(jpeg_folder, "train", 4, train=True, num_workers=0, subset=5, seed=7)
    assert device.dataset.samples == [pil.dataset.dataset.samples[i] for i in pil.dataset.indices]
    assert device.num_classes == pil.num_classes == 3


def test_loader_workers_hand_over_the_same_batches_as_the_main_process(jpeg_folder):
    """Workers pass each batch's file bytes packed in one tensor: `read_file`'s own tensors could not be
    shared with the main process (EBADF in the workers, a loader waiting for ever)."""
    def batches(workers):
        loader = DeviceJpegLoader(jpeg_folder, "val", 4, train=False, num_workers=workers, size=8)
        return [(x, y) for x, y in loader]

    alone, workers = batches(0), batches(2)
    assert len(alone) == len(workers) == 4
    for (xa, ya), (xw, yw) in zip(alone, workers):
        assert torch.equal(xa, xw) and torch.equal(ya, yw)
