"""Downstream images, augmentations and the torch datasets of the three tasks.

Data flow: ``ImageSource`` decodes each record once (``pipeline.imaging.read_image``, uint8 grey) into
a square store at ``load_size``; a dataset (``ClsDataset`` / ``SegDataset`` / ``DetDataset``) is a view
of some of its indices that applies a transform per item (``make_transform``: crops and augmentations,
drawn from a generator keyed by (seed, epoch, item) so results never depend on the worker count);
``to_input`` replicates the grey batch to three channels and normalises it.

Resizing, as the two protocols need it (``ImageSource(resize=, resample=)``):
- ``stretch``: both sides to ``size`` (this tool; MGCA's segmentation and detection datasets);
- ``pad``: the long side to ``size``, the short side zero-padded to it, centred (MGCA's ``resize_img``,
  used by its classification datasets).
- resampling ``antialias`` (PIL bilinear, antialiased when shrinking: this tool), ``area`` (PIL box
  filter, the pixel-area average of MGCA's ``cv2.INTER_AREA``) or ``linear`` (bilinear without
  antialiasing, MGCA's ``cv2.INTER_LINEAR`` in its seg/det datasets).
Masks are stored as the share of each pixel the object covers (0..255, area-averaged): a task may train
on that soft target (MGCA) or threshold it; every metric counts a pixel as foreground when it is
covered at least half (stored above 127).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline import imaging
from pipeline.common import MflagError, progress
from pipeline.downstream.datasets.base import DatasetSpec, Record
from pipeline.imaging import MIN_IMAGE_SIDE, read_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# name -> (mean, std) per channel of [0, 1] inputs
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": ((0.5,) * 3, (0.5,) * 3)}
RESIZES = ("stretch", "pad")
RESAMPLES = ("antialias", "area", "linear")
# Decoded, resized images are kept in memory up to this many bytes (fast epochs on CPU); above it
# every access decodes the file again (use --workers then).
PRELOAD_BUDGET_BYTES = 2 << 30
MASK_ON = 127  # a stored mask pixel (coverage 0..255) is foreground above this: covered (about) half or more


# --------------------------------------------------------------------------- resizing
def resize_u8(img: np.ndarray, size: int | tuple[int, int], resample: str = "antialias") -> np.ndarray:
    """Resize a uint8 H x W array to ``size`` (an int: square; or (height, width)) with one of the
    protocols' ``RESAMPLES`` (``pipeline.imaging.resize_u8``, the one resizer, does the work)."""
    if resample not in RESAMPLES:
        raise ValueError(f"resample must be one of {RESAMPLES}, got {resample!r}")
    return imaging.resize_u8(img, size, resample)


def pad_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """MGCA's ``resize_img``: (new height, new width, top, left) of a height x width image whose long
    side becomes ``size`` (the short side truncated, as its ``int(...)``) and which is then zero-padded
    to size x size, centred with the odd pixel at the bottom/right. A square counts as "higher"."""
    if height >= width:
        nh, nw = size, int(width * (size / float(height)))
        return nh, nw, 0, (size - nw) // 2
    nh, nw = int(height * (size / float(width))), size
    return nh, nw, (size - nh) // 2, 0


def fit_square(img: np.ndarray, size: int, resize: str = "stretch", resample: str = "antialias") -> np.ndarray:
    """A uint8 H x W array as size x size: stretched, or resized and zero-padded (``resize="pad"``)."""
    if resize == "stretch":
        return resize_u8(img, size, resample)
    if resize != "pad":
        raise ValueError(f"resize must be one of {RESIZES}, got {resize!r}")
    nh, nw, top, left = pad_geometry(*img.shape[:2], size)
    out = np.zeros((size, size), np.uint8)
    out[top:top + nh, left:left + nw] = resize_u8(img, (nh, nw), resample)
    return out


# --------------------------------------------------------------------------- image source
class ImageSource:
    """Square uint8 images (and masks, for seg) of a list of records at ``size`` x ``size``.

    ``preload=True`` decodes everything once into one array; otherwise each ``get`` decodes the file.
    ``orig_size(i)`` is the decoded image's (height, width); ``box_transform(i)`` maps its pixel
    coordinates into the stored square.
    """

    def __init__(self, records: Sequence[Record], size: int, mask_fn=None, preload: bool | None = None,
                 desc: str = "images", resize: str = "stretch", resample: str = "antialias",
                 min_side: int = MIN_IMAGE_SIDE):
        if resize not in RESIZES or resample not in RESAMPLES:
            raise ValueError(f"resize {resize!r} / resample {resample!r}: expected one of {RESIZES} / {RESAMPLES}")
        self.records = list(records)
        self.size = int(size)
        self.mask_fn = mask_fn
        self.resize = resize
        self.resample = resample
        self.min_side = int(min_side)  # smaller images stop the run (pipeline.imaging.MIN_IMAGE_SIDE)
        n = len(self.records)
        if preload is None:
            per = size * size * (2 if mask_fn else 1)
            preload = n * per <= PRELOAD_BUDGET_BYTES
        self._images: np.ndarray | None = None
        self._masks: np.ndarray | None = None
        self._sizes: list[tuple[int, int] | None] = [None] * n
        if preload and n:
            self._images = np.empty((n, size, size), np.uint8)
            self._masks = np.empty((n, size, size), np.uint8) if mask_fn else None
            for i in progress(range(n), total=n, desc=f"decode {desc}", unit="img"):
                img, mask = self._decode(i)
                self._images[i] = img
                if mask is not None:
                    self._masks[i] = mask

    def __len__(self) -> int:
        return len(self.records)

    def _decode(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:

        rec = self.records[i]
        try:
            img = read_image(rec.path)
        except MflagError:
            raise
        except Exception as e:  # a corrupt file should name itself, not crash deep in PIL/pydicom
            raise MflagError(f"{rec.path}: cannot read image {rec.image_id!r} ({e})") from e
        h, w = img.shape[:2]
        if min(h, w) < self.min_side:  # a test image is never dropped silently: the run stops, naming it
            raise MflagError(f"{rec.path}: image {rec.image_id!r} is {h}x{w} px, below the {self.min_side} px "
                             "minimum side of a usable radiograph; replace the file or leave it out of the labels")
        self._sizes[i] = (h, w)
        mask = None
        if self.mask_fn is not None:
            m = np.asarray(self.mask_fn(rec, h, w))
            if m.shape != (h, w):
                raise MflagError(f"{rec.path}: mask is {m.shape}, image is {(h, w)}")
            # the area average of the binary mask: each stored pixel holds the share it covers
            mask = fit_square((m > 0).astype(np.uint8) * 255, self.size, self.resize, "area")
        return fit_square(img, self.size, self.resize, self.resample), mask

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self._images is not None:
            return self._images[i], (self._masks[i] if self._masks is not None else None)
        return self._decode(i)

    def orig_size(self, i: int) -> tuple[int, int]:
        if self._sizes[i] is None:
            rec = self.records[i]
            if rec.size is not None:
                return tuple(rec.size)
            self._decode(i)
        return self._sizes[i]

    def box_transform(self, i: int) -> tuple[float, float, float, float]:
        """(sx, sy, ox, oy): a point (x, y) of the decoded image lies at (x*sx + ox, y*sy + oy) in the store."""
        h, w = self.orig_size(i)
        if self.resize == "stretch":
            return self.size / w, self.size / h, 0.0, 0.0
        nh, nw, top, left = pad_geometry(h, w, self.size)
        return nw / w, nh / h, float(left), float(top)


def to_input(img_u8: torch.Tensor, norm: str = "imagenet") -> torch.Tensor:
    """B x H x W (or H x W) uint8 -> B x 3 x H x W float, normalised with ``NORMALIZATIONS[norm]``."""
    x = img_u8.float().div(255.0)
    if x.ndim == 2:
        x = x[None]
    x = x.unsqueeze(-3).expand(*x.shape[:-2], 3, *x.shape[-2:])
    m, s = NORMALIZATIONS[norm]
    mean = torch.tensor(m, device=x.device).view(3, 1, 1)
    std = torch.tensor(s, device=x.device).view(3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------- transforms
# A transform maps (uint8 H x W image, uint8 mask or None, numpy Generator) -> (image, mask). They are
# module-level classes so DataLoader workers can pickle them.
class MildAugment:
    """This tool's CXR augmentation: random affine (scale 0.9-1.1, shift 5%, rotate 5 deg) applied jointly
    to image and mask (``geometric=False`` skips it), then brightness/contrast jitter of 10%. No flips:
    laterality matters in CXR."""

    def __init__(self, geometric: bool = True):
        self.geometric = geometric

    def __call__(self, img, mask, rng):
        from PIL import Image

        if self.geometric:
            s = img.shape[0]
            scale = rng.uniform(0.9, 1.1)
            angle = math.radians(rng.uniform(-5, 5))
            tx, ty = rng.uniform(-0.05, 0.05, size=2) * s
            c = (s - 1) / 2
            # inverse map (output -> input) for PIL's affine transform
            a, b = math.cos(angle) / scale, math.sin(angle) / scale
            d, e = -b, a
            coeffs = (a, b, c - a * (c + tx) - b * (c + ty), d, e, c - d * (c + tx) - e * (c + ty))
            img = np.array(Image.fromarray(img).transform(img.shape[::-1], Image.AFFINE, coeffs,
                                                          resample=Image.BILINEAR))
            if mask is not None:
                mask = np.array(Image.fromarray(mask).transform(mask.shape[::-1], Image.AFFINE, coeffs,
                                                                resample=Image.NEAREST))
        gain = rng.uniform(0.9, 1.1)
        bias = rng.uniform(-0.1, 0.1) * 255
        mean = float(img.mean())
        img = np.clip((img.astype(np.float32) - mean) * gain + mean + bias, 0, 255).astype(np.uint8)
        return img, mask


class Crop:
    """A ``size`` x ``size`` crop: uniformly placed (``random=True``, torchvision's RandomCrop) or centred
    (CenterCrop: top = round((H - size) / 2)), applied to image and mask alike."""

    def __init__(self, size: int, random: bool):
        self.size, self.random = int(size), random

    def __call__(self, img, mask, rng):
        h, w = img.shape
        if (h, w) == (self.size, self.size):
            return img, mask
        if self.random:
            top, left = int(rng.integers(0, h - self.size + 1)), int(rng.integers(0, w - self.size + 1))
        else:
            top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
        sl = (slice(top, top + self.size), slice(left, left + self.size))
        return img[sl], (mask[sl] if mask is not None else None)


class Moco2Color:
    """MGCA's CheXpert training transform after its crop (``Moco2Transform``, mgca/datasets/transforms.py):
    ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, RandomGrayscale p 0.2, PIL Gaussian blur of radius
    U(0.1, 2.0) with p 0.5, horizontal flip p 0.5. The images are grey replicated to RGB, on which
    saturation, hue and greyscale conversion change nothing, so only brightness and contrast (in
    random order, as ColorJitter) are applied, on the grey image, with torchvision's functional ops."""

    def __call__(self, img, mask, rng):
        import torchvision.transforms.functional as TF
        from PIL import Image, ImageFilter

        pil = Image.fromarray(img)
        if rng.random() < 0.8:
            ops = [("b", rng.uniform(0.6, 1.4)), ("c", rng.uniform(0.6, 1.4))]
            for k in rng.permutation(2):
                kind, f = ops[k]
                pil = TF.adjust_brightness(pil, f) if kind == "b" else TF.adjust_contrast(pil, f)
        rng.random()  # RandomGrayscale's draw: an identity on grey images, kept so the stream matches the recipe
        if rng.random() < 0.5:
            pil = pil.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
        out = np.asarray(pil)
        if rng.random() < 0.5:
            out = out[:, ::-1]
            mask = mask[:, ::-1] if mask is not None else None
        return np.ascontiguousarray(out), mask


class ShiftScaleRotate:
    """albumentations' ShiftScaleRotate as MGCA's segmentation datasets configure it
    (mgca/datasets/segmentation_dataset.py): with probability ``p`` one affine about the centre with
    shift U(-shift, shift) of the size, scale U(1 - scale, 1 + scale), angle U(-rotate, rotate)
    degrees, constant zero border; bilinear for the image, nearest for the mask (torchvision's affine)."""

    def __init__(self, shift: float = 0.0, scale: float = 0.1, rotate: float = 10.0, p: float = 0.5):
        self.shift, self.scale, self.rotate, self.p = shift, scale, rotate, p

    def __call__(self, img, mask, rng):
        import torchvision.transforms.functional as TF
        from PIL import Image
        from torchvision.transforms import InterpolationMode

        if rng.random() >= self.p:
            return img, mask
        angle = float(rng.uniform(-self.rotate, self.rotate))
        scale = float(rng.uniform(1 - self.scale, 1 + self.scale))
        h, w = img.shape
        tx, ty = (rng.uniform(-self.shift, self.shift, size=2) * (w, h)).round().astype(int).tolist()
        kw = dict(angle=angle, translate=[tx, ty], scale=scale, shear=[0.0], fill=0)
        img = np.asarray(TF.affine(Image.fromarray(img), interpolation=InterpolationMode.BILINEAR, **kw))
        if mask is not None:
            mask = np.asarray(TF.affine(Image.fromarray(mask), interpolation=InterpolationMode.NEAREST, **kw))
        return img, mask


class Compose:
    def __init__(self, *steps):
        self.steps = steps

    def __call__(self, img, mask, rng):
        for s in self.steps:
            img, mask = s(img, mask, rng)
        return img, mask


TRANSFORMS = ("none", "mild", "photometric", "crop", "moco2", "center-crop", "shift-scale-rotate")


def make_transform(name: str, crop: int) -> Callable | None:
    """The transform called ``name`` (``TRANSFORMS``); ``crop`` is the network input size that the crop
    transforms cut from the stored image. ``none`` returns None (no transform)."""
    table = {
        "none": lambda: None,
        "mild": lambda: MildAugment(),
        "photometric": lambda: MildAugment(geometric=False),
        "crop": lambda: Crop(crop, random=True),
        "moco2": lambda: Compose(Crop(crop, random=True), Moco2Color()),
        "center-crop": lambda: Crop(crop, random=False),
        "shift-scale-rotate": lambda: ShiftScaleRotate(),
    }
    if name not in table:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {name!r}")
    return table[name]()


# --------------------------------------------------------------------------- torch datasets
class _Items(Dataset):
    """A view of ``indices`` of an ``ImageSource`` (all of it by default) with an optional per-item
    transform, so splits and seeds share one decoded store."""

    def __init__(self, source: ImageSource, indices: Sequence[int] | None = None, transform=None, seed: int = 0):
        self.source = source
        self.indices = list(range(len(source))) if indices is None else [int(i) for i in indices]
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def _item(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        img, mask = self.source.get(self.indices[i])
        if self.transform is not None:
            # keyed by (seed, epoch, item): independent of worker count and sampling order
            img, mask = self.transform(img, mask, np.random.default_rng([self.seed, self.epoch, i, 0x5EED]))
        # writable and contiguous (a PIL result is read-only): torch.from_numpy shares the memory
        return np.require(img, requirements="CW"), (np.require(mask, requirements="CW") if mask is not None else None)

    def image_ids(self) -> list[str]:
        return [self.source.records[j].image_id for j in self.indices]


class ClsDataset(_Items):
    """Items: (uint8 image tensor, float label vector); ``labels`` is len(indices) x C."""

    def __init__(self, source: ImageSource, labels: np.ndarray, indices: Sequence[int] | None = None,
                 transform=None, seed: int = 0):
        super().__init__(source, indices, transform, seed)
        self.labels = np.asarray(labels, np.float32)
        if len(self.labels) != len(self.indices):
            raise ValueError(f"{len(self.labels)} label rows for {len(self.indices)} images")

    def __getitem__(self, i):
        img, _ = self._item(i)
        return torch.from_numpy(img), torch.from_numpy(self.labels[i])


class SegDataset(_Items):
    """Items: (uint8 image, uint8 mask holding each pixel's covered share 0..255)."""

    def __getitem__(self, i):
        img, mask = self._item(i)
        if mask is None:
            raise MflagError("segmentation needs masks: the dataset has no mask_fn")
        return torch.from_numpy(img), torch.from_numpy(mask)


class DetDataset(_Items):
    """Items: (uint8 image, target dict with ``boxes`` K x 4 in stored pixels and ``labels``).

    Boxes are mapped by the source's ``box_transform``, clipped to the image and dropped when under one
    pixel wide or high (torchvision rejects degenerate boxes). Transforms must be photometric: boxes
    are not re-fitted to moved shapes."""

    def target(self, i: int) -> dict:
        j = self.indices[i]
        rec = self.source.records[j]
        s = self.source.size
        boxes = np.asarray(rec.boxes, np.float32).reshape(-1, 4)
        if len(boxes):
            sx, sy, ox, oy = self.source.box_transform(j)
            boxes = boxes * np.array([sx, sy, sx, sy], np.float32) + np.array([ox, oy, ox, oy], np.float32)
            boxes = np.clip(boxes, 0, s)
            keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
            boxes = boxes[keep]
        return {"boxes": torch.from_numpy(boxes), "labels": torch.ones(len(boxes), dtype=torch.int64)}

    def __getitem__(self, i):
        img, _ = self._item(i)
        return torch.from_numpy(img), self.target(i)


def collate_det(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def labels_matrix(spec: DatasetSpec, records: Sequence[Record]) -> np.ndarray:
    """N x C float labels of ``records``; an error naming the image when a record lacks labels."""
    c = len(spec.class_names)
    out = np.zeros((len(records), c), np.float32)
    for i, r in enumerate(records):
        if len(r.labels) != c:
            raise MflagError(f"{spec.name}: image {r.image_id!r} has {len(r.labels)} labels, "
                             f"expected {c} ({', '.join(spec.class_names)})")
        out[i] = r.labels
    return out
