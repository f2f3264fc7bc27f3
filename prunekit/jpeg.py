"""ImageNet-style JPEG folders decoded on the training device.

Loader workers only read file bytes; the main process decodes each batch with one batched
`torchvision.io.decode_jpeg` call on the device (nvJPEG on a GPU, libjpeg-turbo on a CPU) and
crops, resizes, flips and normalises there, so on a GPU the CPU cores no longer bound the step.
Crop and flip draws come from a generator seeded by (seed, epoch, batch): runs replay exactly.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import DATASET_STATS, DataError, ImageFolderLoader, _epoch_seed, open_image_folder, subset_indices
from .errors import one_line

JPEG_MAGIC = b"\xff\xd8"


class EncodedImages(torch.utils.data.Dataset):
    """(file bytes as a uint8 tensor, label, index) of each (path, label) sample."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from torchvision.io import read_file

        path, label = self.samples[index]
        try:
            return read_file(path), label, index
        except (OSError, RuntimeError) as error:
            raise DataError(f"{path}: unreadable file ({one_line(error)})") from None


def _collate(batch):
    """The batch's file bytes packed into one tensor, with their lengths: a worker hands the main process one
    shared-memory segment per batch, not one per image (`read_file`'s tensors fail to share: EBADF)."""
    data, labels, indices = zip(*batch)
    return torch.cat(data), torch.tensor([len(d) for d in data]), torch.tensor(labels), list(indices)


def random_resized_crop_box(height: int, width: int, generator: torch.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of Inception-style random-resized-crop (torchvision's rule, drawn from `generator`)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop of the nearest allowed aspect ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, resize: int = 256, crop: int = 224) -> tuple[int, int, int, int]:
    """(top, left, h, w), in the original image, of resize-shorter-side-to-`resize` then center-crop `crop`."""
    side = min(height, width) * crop / resize
    h, w = min(height, int(round(side))), min(width, int(round(side)))
    return (height - h) // 2, (width - w) // 2, h, w


class DeviceJpegLoader(ImageFolderLoader):
    """`root/{train,val}/<class>/<image>` with decoding and augmentation on `device`. Its own dataset,
    collation and batches; epochs, seeding and length as `data.ImageFolderLoader`. Non-JPEG files are
    decoded one by one (torchvision.io.decode_image)."""

    def __init__(self, root: str | Path, split: str, batch_size: int, *, train: bool,
                 device: str | torch.device = "cpu", seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, subset: int | None = None, channels_last: bool = False,
                 size: int = 224):
        found = open_image_folder(root, split, loader=lambda path: path)
        self.num_classes = len(found.classes)
        samples = found.samples
        if subset is not None:
            samples = [samples[i] for i in subset_indices(len(samples), subset, seed)]
        self.dataset = EncodedImages(samples)
        self.device, self.train, self.size = torch.device(device), train, size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.channels_last, self.epoch = channels_last, 0
        mean, std = DATASET_STATS["imagenet"]
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
        self._generator = torch.Generator()
        if world_size > 1:
            self._sampler = torch.utils.data.DistributedSampler(self.dataset, world_size, rank, shuffle=train,
                                                                seed=seed, drop_last=train)
        elif train:
            self._sampler = torch.utils.data.RandomSampler(self.dataset, generator=self._generator)
        else:
            self._sampler = torch.utils.data.SequentialSampler(self.dataset)
        self._loader = torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, sampler=self._sampler,
                                                   num_workers=num_workers, collate_fn=_collate, drop_last=train,
                                                   persistent_workers=num_workers > 0)
        self.set_epoch(0)

    def _decode(self, data: list[torch.Tensor], indices: list[int]) -> list[torch.Tensor]:
        """RGB uint8 C×H×W images on the device: JPEGs in one batched call, other formats one by one."""
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        jpeg = [i for i, d in enumerate(data) if bytes(d[:2].tolist()) == JPEG_MAGIC]
        images: list[torch.Tensor | None] = [None] * len(data)
        try:
            if jpeg:
                for i, image in zip(jpeg, decode_jpeg([data[i] for i in jpeg], mode=ImageReadMode.RGB,
                                                      device=self.device)):
                    images[i] = image
            for i, d in enumerate(data):
                if images[i] is None:
                    images[i] = decode_image(d, mode=ImageReadMode.RGB).to(self.device)
        except RuntimeError:
            for i, d in enumerate(data):  # find the file that does not decode, and name it
                try:
                    decode_image(d, mode=ImageReadMode.RGB)
                except RuntimeError as error:
                    path = self.dataset.samples[indices[i]][0]
                    raise DataError(f"{path}: unreadable image ({one_line(error)}) (expected a JPEG or PNG file)") from None
            raise
        return images

    def _crop(self, images: list[torch.Tensor], batch: int) -> torch.Tensor:
        """Random-resized crop + flip (training) or resize-and-center-crop (evaluation), to `size`², stacked."""
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch) * 1_000_003 + batch)
        out = []
        for image in images:
            height, width = image.shape[1:]
            top, left, h, w = (random_resized_crop_box(height, width, generator) if self.train
                               else center_crop_box(height, width, crop=self.size))
            crop = image[:, top:top + h, left:left + w].unsqueeze(0).float()
            crop = F.interpolate(crop, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                 antialias=True)
            if self.train and torch.rand(1, generator=generator).item() < 0.5:
                crop = crop.flip(3)
            out.append(crop)
        x = (torch.cat(out) - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch, (packed, lengths, labels, indices) in enumerate(self._loader):
            images = self._decode(list(packed.split(lengths.tolist())), indices)
            yield self._crop(images, batch), labels.to(self.device, non_blocking=True)
