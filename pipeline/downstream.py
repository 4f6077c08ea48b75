"""Downstream heads, datasets and train/eval loops for cls, seg and det on a ResNet50 encoder.

Images are read with ``pipeline.imaging.read_image`` (uint8 grey), resized to a square
``image_size`` (as the original M-FLAG preprocessing does), replicated to three channels and
normalised the way the encoder was trained: ImageNet statistics for torchvision's ImageNet weights,
mean 0.5 / std 0.5 for M-FLAG (original code and this tool's train-vision) and the peers' encoders.

Training follows one loop (``fit``): AdamW on the trainable parameters, evaluation on the validation
split after every epoch, early stopping after ``patience`` epochs without improvement of the
task's primary metric, and the best-validation weights restored before the test evaluation.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline import metrics
from pipeline.common import MflagError, progress
from pipeline.datasets.base import DatasetSpec, Record

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# name -> (mean, std) per channel of [0, 1] inputs
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": ((0.5,) * 3, (0.5,) * 3)}
FEATURE_DIM = 2048
# Decoded, resized images are kept in memory up to this many bytes (fast epochs on CPU); above it
# every access decodes the file again (use --workers then).
PRELOAD_BUDGET_BYTES = 2 << 30


# --------------------------------------------------------------------------- image source
class ImageSource:
    """Square uint8 images (and masks, for seg) of a list of records at ``size`` x ``size``.

    ``preload=True`` decodes everything once into one array; otherwise each ``get`` decodes the file.
    ``orig_size(i)`` is the decoded image's (height, width), used to rescale boxes.
    """

    def __init__(self, records: Sequence[Record], size: int, mask_fn=None, preload: bool | None = None,
                 desc: str = "images"):
        self.records = list(records)
        self.size = int(size)
        self.mask_fn = mask_fn
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
        from pipeline.imaging import read_image

        rec = self.records[i]
        try:
            img = read_image(rec.path)
        except MflagError:
            raise
        except Exception as e:  # a corrupt file should name itself, not crash deep in PIL/pydicom
            raise MflagError(f"{rec.path}: cannot read image {rec.image_id!r} ({e})") from e
        h, w = img.shape[:2]
        self._sizes[i] = (h, w)
        mask = None
        if self.mask_fn is not None:
            m = np.asarray(self.mask_fn(rec, h, w))
            if m.shape != (h, w):
                raise MflagError(f"{rec.path}: mask is {m.shape}, image is {(h, w)}")
            # antialiased resize then threshold: a pixel is foreground if over half its area was
            mask = resize_u8((m > 0).astype(np.uint8) * 255, self.size) > 127
            mask = mask.astype(np.uint8)
        return resize_u8(img, self.size), mask

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


def resize_u8(img: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """Resize a uint8 HxW array to size x size (antialiased bilinear, or nearest for masks)."""
    from PIL import Image

    if img.shape == (size, size):
        return np.ascontiguousarray(img)
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((size, size), resample))


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


# --------------------------------------------------------------------------- augmentation
def augment(img: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator,
            geometric: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Mild CXR augmentation: random affine (scale 0.9-1.1, shift 5%, rotate 5 deg) applied jointly to
    image and mask, then brightness/contrast jitter of 10%. No flips: laterality matters in CXR."""
    from PIL import Image

    if geometric:
        s = img.shape[0]
        scale = rng.uniform(0.9, 1.1)
        angle = math.radians(rng.uniform(-5, 5))
        tx, ty = rng.uniform(-0.05, 0.05, size=2) * s
        c = (s - 1) / 2
        # inverse map (output -> input) for PIL's affine transform
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        a, b = cos, sin
        d, e = -sin, cos
        cx = c - a * (c + tx) - b * (c + ty)
        cy = c - d * (c + tx) - e * (c + ty)
        coeffs = (a, b, cx, d, e, cy)
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


# --------------------------------------------------------------------------- torch datasets
class _Base(Dataset):
    """A view of ``indices`` of an ``ImageSource`` (all of it by default), so splits and seeds share
    one decoded store."""

    def __init__(self, source: ImageSource, indices: Sequence[int] | None = None, augment: bool = False,
                 seed: int = 0):
        self.source = source
        self.indices = list(range(len(source))) if indices is None else [int(i) for i in indices]
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def _rng(self, i: int) -> np.random.Generator:
        # Keyed by (seed, epoch, item) so results do not depend on worker count or sampling order.
        return np.random.default_rng([self.seed, self.epoch, i, 0x5EED])


class ClsDataset(_Base):
    """Items: (uint8 S x S image tensor, float label vector); ``labels`` is len(indices) x C."""

    def __init__(self, source: ImageSource, labels: np.ndarray, indices: Sequence[int] | None = None,
                 augment: bool = False, seed: int = 0):
        super().__init__(source, indices, augment, seed)
        self.labels = np.asarray(labels, np.float32)
        if len(self.labels) != len(self.indices):
            raise ValueError(f"{len(self.labels)} label rows for {len(self.indices)} images")

    def __getitem__(self, i):
        img, _ = self.source.get(self.indices[i])
        if self.augment:
            img, _ = augment(img, None, self._rng(i))
        return torch.from_numpy(np.ascontiguousarray(img)), torch.from_numpy(self.labels[i])


class SegDataset(_Base):
    """Items: (uint8 S x S image, uint8 S x S 0/1 mask)."""

    def __getitem__(self, i):
        img, mask = self.source.get(self.indices[i])
        if mask is None:
            raise MflagError("segmentation needs masks: the dataset has no mask_fn")
        if self.augment:
            img, mask = augment(img, mask, self._rng(i))
        return torch.from_numpy(np.ascontiguousarray(img)), torch.from_numpy(np.ascontiguousarray(mask))


class DetDataset(_Base):
    """Items: (uint8 S x S image, target dict with ``boxes`` K x 4 in resized pixels and ``labels``).

    Boxes are scaled from the decoded image size, clipped to the image and dropped when under one
    pixel wide or high after resizing (torchvision rejects degenerate boxes)."""

    def target(self, i: int) -> dict:
        j = self.indices[i]
        rec = self.source.records[j]
        s = self.source.size
        boxes = np.asarray(rec.boxes, np.float32).reshape(-1, 4)
        if len(boxes):
            h, w = self.source.orig_size(j)
            boxes = boxes * np.array([s / w, s / h, s / w, s / h], np.float32)
            boxes = np.clip(boxes, 0, s)
            keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
            boxes = boxes[keep]
        return {"boxes": torch.from_numpy(boxes), "labels": torch.ones(len(boxes), dtype=torch.int64)}

    def __getitem__(self, i):
        img, _ = self.source.get(self.indices[i])
        # photometric only: geometric jitter would need boxes re-fitted to rotated shapes
        if self.augment:
            img, _ = augment(img, None, self._rng(i), geometric=False)
        return torch.from_numpy(np.ascontiguousarray(img)), self.target(i)


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


# --------------------------------------------------------------------------- settings and loop
@dataclasses.dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    patience: int
    seed: int
    device: str = "cpu"
    workers: int = 0
    weight_decay: float = 1e-4
    norm: str = "imagenet"  # key of NORMALIZATIONS


@dataclasses.dataclass
class FitResult:
    best_epoch: int
    history: list[dict]
    selection: str  # the validation metric the best epoch maximised


def _loader(ds, settings: TrainSettings, shuffle: bool, collate=None) -> DataLoader:
    g = torch.Generator().manual_seed(settings.seed)
    return DataLoader(ds, batch_size=settings.batch_size, shuffle=shuffle, num_workers=settings.workers,
                      collate_fn=collate, generator=g, drop_last=False,
                      persistent_workers=False)


def _trainable_state(model: nn.Module) -> dict:
    # Frozen parameters (and the statistics of frozen BN layers, kept in eval mode) never change, so
    # the snapshot of the best epoch only copies the rest.
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in frozen}


def fit(model: nn.Module, train_epoch: Callable[[int], float], validate: Callable[[], dict],
        primary: str, settings: TrainSettings, desc: str) -> FitResult:
    """Train for up to ``settings.epochs`` epochs with early stopping on ``validate()[primary]``.

    ``train_epoch(epoch) -> mean loss``; ``validate() -> dict`` of metrics (and ``loss`` if it has one).
    When the primary metric is undefined on the validation split (NaN, e.g. no positive), the
    validation loss (or, failing that, the training loss) selects the epoch instead; ties on the
    metric go to the lower validation (else training) loss. On return the model holds the best
    epoch's weights.
    """
    best_key, best_state, best_epoch, bad = (-math.inf, -math.inf), None, -1, 0
    history: list[dict] = []
    selection = primary
    for epoch in range(settings.epochs):
        train_loss = train_epoch(epoch)
        val = validate()
        row = {"epoch": epoch, "train_loss": train_loss, **{f"val_{k}": v for k, v in val.items()
                                                              if isinstance(v, (int, float))}}
        score = val.get(primary, float("nan"))
        if not _finite(score):
            if _finite(val.get("loss", float("nan"))):
                selection, score = "val_loss (primary metric undefined on val)", -val["loss"]
            else:
                selection, score = "train_loss (primary metric undefined on val)", -train_loss
        history.append(row)
        log.info("%s epoch %d: train loss %.4f, val %s %s", desc, epoch, train_loss, primary,
                 f"{val.get(primary, float('nan')):.4f}")
        # ties on the primary metric (common on small validation sets, e.g. mAP 0 early in detection)
        # go to the lower validation loss, or the lower training loss where there is none
        key = (score, -val["loss"] if _finite(val.get("loss")) else -train_loss)
        if key > best_key:
            best_key, best_epoch, bad = key, epoch, 0
            best_state = _trainable_state(model)
        else:
            bad += 1
            if bad >= settings.patience:
                log.info("%s: early stop at epoch %d (best %d)", desc, epoch, best_epoch)
                break
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    return FitResult(best_epoch=best_epoch, history=history, selection=selection)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _set_train(model: nn.Module, frozen: Sequence[nn.Module]) -> None:
    model.train()
    for m in frozen:  # frozen BN layers keep their statistics
        m.eval()


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


def _optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MflagError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


# --------------------------------------------------------------------------- random encoders
@torch.no_grad()
def calibrate_bn(encoder: nn.Module, source: ImageSource, indices: Sequence[int], settings: TrainSettings,
                 max_images: int = 512) -> int:
    """Re-estimate the BatchNorm running statistics of ``encoder`` on (up to ``max_images`` of) the
    images at ``indices``; weights are untouched. Returns the number of images used.

    A randomly initialised ResNet's running statistics (mean 0, variance 1) describe no data, so a
    frozen random encoder would run un-normalised (features grow about 50x through the four stages)
    and heads on it train unstably. Train-mode BN would use batch statistics; this gives the frozen
    random baseline the same normalisation without training anything.
    """
    bns = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    idx = list(indices)[:max_images]
    if not bns or not idx:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    encoder.to(settings.device).train()
    bs = max(2, settings.batch_size)
    # no batch of one image: BN cannot take batch statistics of a single 1x1 feature map
    starts = [s for s in range(0, len(idx), bs) if len(idx) - s > 1 or s == 0]
    for s in starts:
        batch = torch.from_numpy(np.stack([source.get(i)[0] for i in idx[s:s + bs]]))
        encoder(to_input(batch.to(settings.device), settings.norm))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    encoder.eval()
    return len(idx)


# --------------------------------------------------------------------------- classification
def cls_loss(logits: torch.Tensor, y: torch.Tensor, label_kind: str) -> torch.Tensor:
    if label_kind == "multiclass":
        return F.cross_entropy(logits, y.argmax(1))
    return F.binary_cross_entropy_with_logits(logits, y)


def cls_scores(logits: torch.Tensor, label_kind: str) -> torch.Tensor:
    return logits.softmax(1) if label_kind == "multiclass" else logits.sigmoid()


@torch.no_grad()
def extract_features(encoder: nn.Module, source: ImageSource, indices: Sequence[int], settings: TrainSettings,
                     desc: str = "features") -> np.ndarray:
    """len(indices) x 2048 pooled encoder features of those images of ``source`` (eval mode, no
    augmentation)."""
    encoder.eval().to(settings.device)
    ds = ClsDataset(source, np.zeros((len(indices), 0), np.float32), indices)
    out = []
    for img, _ in progress(_loader(ds, settings, shuffle=False), total=math.ceil(len(ds) / settings.batch_size),
                           desc=desc, unit="batch"):
        out.append(encoder(to_input(img.to(settings.device), settings.norm)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM), np.float32)


def train_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                       label_kind: str, class_names: Sequence[str], settings: TrainSettings
                       ) -> tuple[Callable[[np.ndarray], np.ndarray], FitResult]:
    """Fit a linear layer on precomputed features (standardised with the training statistics).

    Returns ``predict(features) -> scores`` (sigmoid or softmax) from the best-validation epoch.
    """
    torch.manual_seed(settings.seed)
    mean = train_x.mean(0, keepdims=True)
    std = train_x.std(0, keepdims=True) + 1e-6
    tx = torch.from_numpy((train_x - mean) / std).float()
    ty = torch.from_numpy(train_y).float()
    vx = torch.from_numpy((val_x - mean) / std).float()
    head = nn.Linear(train_x.shape[1], train_y.shape[1])
    opt = _optimizer(head, settings)
    g = torch.Generator().manual_seed(settings.seed)
    primary = metrics.primary_metric("cls", label_kind)

    def train_epoch(epoch: int) -> float:
        head.train()
        perm = torch.randperm(len(tx), generator=g)
        total = 0.0
        for s in range(0, len(tx), settings.batch_size):
            idx = perm[s:s + settings.batch_size]
            loss = cls_loss(head(tx[idx]), ty[idx], label_kind)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        return total / max(len(tx), 1)

    @torch.no_grad()
    def validate() -> dict:
        head.eval()
        logits = head(vx)
        res = metrics.classification_metrics(val_y, cls_scores(logits, label_kind).numpy(), label_kind, class_names)
        res["loss"] = float(cls_loss(logits, torch.from_numpy(val_y).float(), label_kind))
        return res

    fitted = fit(head, train_epoch, validate, primary, settings, "linear probe")
    head.eval()

    @torch.no_grad()
    def predict(x: np.ndarray) -> np.ndarray:
        return cls_scores(head(torch.from_numpy((x - mean) / std).float()), label_kind).numpy()

    return predict, fitted


class Classifier(nn.Module):
    """Encoder (pooled 2048-d features) followed by one linear layer."""

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(FEATURE_DIM, n_classes)

    def forward(self, x):
        return self.head(self.encoder(x))


@torch.no_grad()
def predict_classifier(model: nn.Module, ds: ClsDataset, settings: TrainSettings) -> np.ndarray:
    """Logits of every item of ``ds`` (N x C)."""
    model.eval()
    out = [model(to_input(img.to(settings.device), settings.norm)).float().cpu()
           for img, _ in _loader(ds, settings, False)]
    return torch.cat(out).numpy() if out else np.zeros((0, model.head.out_features), np.float32)


def train_classifier(model: Classifier, train_ds: ClsDataset, val_ds: ClsDataset, label_kind: str,
                     class_names: Sequence[str], settings: TrainSettings) -> FitResult:
    """Fine-tune encoder and head end to end (``--finetune``)."""
    model.to(settings.device)
    opt = _optimizer(model, settings)
    primary = metrics.primary_metric("cls", label_kind)
    loader = _loader(train_ds, settings, shuffle=True)

    def train_epoch(epoch: int) -> float:
        train_ds.set_epoch(epoch)
        _set_train(model, [])
        total, n = 0.0, 0
        for img, y in progress(loader, total=len(loader), desc=f"cls epoch {epoch}", unit="batch"):
            logits = model(to_input(img.to(settings.device), settings.norm))
            loss = cls_loss(logits, y.to(settings.device), label_kind)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(img), n + len(img)
        return total / max(n, 1)

    def validate() -> dict:
        logits = torch.from_numpy(predict_classifier(model, val_ds, settings))
        res = metrics.classification_metrics(val_ds.labels, cls_scores(logits, label_kind).numpy(),
                                             label_kind, class_names)
        res["loss"] = float(cls_loss(logits, torch.from_numpy(val_ds.labels), label_kind))
        return res

    return fit(model, train_epoch, validate, primary, settings, "cls finetune")


# --------------------------------------------------------------------------- segmentation
def build_unet(encoder_state: dict, finetune: bool) -> nn.Module:
    """smp U-Net with a ResNet50 encoder holding ``encoder_state`` (torchvision keys, no ``fc``).

    Loading is strict; without ``finetune`` the encoder is frozen (weights and BN statistics).
    """
    import segmentation_models_pytorch as smp

    model = smp.Unet(encoder_name="resnet50", encoder_weights=None, in_channels=3, classes=1)
    state = {k: v for k, v in encoder_state.items() if not k.startswith("fc.")}
    try:
        model.encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MflagError(f"encoder weights do not fit the U-Net's ResNet50 encoder: {e}") from e
    if not finetune:
        freeze(model.encoder)
    return model


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE plus soft Dice (per image, so small lesions weigh as much as large ones)."""
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce + dice.mean()


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, ds: SegDataset, settings: TrainSettings) -> dict:
    """Dice metrics (``metrics.DiceAccumulator``) and mean loss of ``model`` on ``ds``."""
    model.eval()
    acc = metrics.DiceAccumulator()
    total, n = 0.0, 0
    for img, mask in _loader(ds, settings, False):
        logits = model(to_input(img.to(settings.device), settings.norm))[:, 0]
        mask = mask.to(settings.device)
        total, n = total + float(seg_loss(logits, mask)) * len(img), n + len(img)
        acc.update((logits.sigmoid() > 0.5).cpu(), mask.cpu())
    res = acc.compute()
    res["loss"] = total / max(n, 1)
    return res


def train_segmenter(model: nn.Module, train_ds: SegDataset, val_ds: SegDataset, settings: TrainSettings
                    ) -> FitResult:
    model.to(settings.device)
    opt = _optimizer(model, settings)
    frozen = [model.encoder] if not any(p.requires_grad for p in model.encoder.parameters()) else []
    loader = _loader(train_ds, settings, shuffle=True)

    def train_epoch(epoch: int) -> float:
        train_ds.set_epoch(epoch)
        _set_train(model, frozen)
        total, n = 0.0, 0
        for img, mask in progress(loader, total=len(loader), desc=f"seg epoch {epoch}", unit="batch"):
            logits = model(to_input(img.to(settings.device), settings.norm))[:, 0]
            loss = seg_loss(logits, mask.to(settings.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(img), n + len(img)
        return total / max(n, 1)

    return fit(model, train_epoch, lambda: evaluate_segmenter(model, val_ds, settings), "dice", settings, "seg")


# --------------------------------------------------------------------------- detection
DET_MODELS = ("fasterrcnn", "retinanet")


def _anchor_sizes(image_size: int, n_levels: int, first: int) -> tuple[int, ...]:
    # torchvision's defaults (32..512 px) are tuned for ~800 px inputs; scale them with the image so
    # small CPU-sized inputs still have anchors that fit their objects.
    scale = min(1.0, image_size / 512)
    return tuple(max(4, int(round(first * 2 ** i * scale))) for i in range(n_levels))


def build_detector(kind: str, encoder_state: dict, image_size: int, finetune: bool,
                   num_classes: int = 2, norm: str = "imagenet") -> nn.Module:
    """torchvision Faster R-CNN or RetinaNet with an FPN on a ResNet50 body holding ``encoder_state``.

    The body uses frozen batch norm (torchvision's detection convention); without ``finetune`` the
    whole body is frozen (trainable_layers=0), with it all five stages train. Inputs are resized to
    ``image_size`` (min_size = max_size) and normalised with ``NORMALIZATIONS[norm]``.
    """
    import torchvision
    from torchvision.models.detection import FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if kind not in DET_MODELS:
        raise MflagError(f"unknown detection model {kind!r}; choose one of {', '.join(DET_MODELS)}")
    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    body.fc = nn.Identity()
    state = {k: v for k, v in encoder_state.items() if not k.startswith("fc.")}
    missing, unexpected = body.load_state_dict(state, strict=False)
    # FrozenBatchNorm2d has no num_batches_tracked buffer; everything else must match.
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise MflagError(f"encoder weights do not fit the detection ResNet50 body: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    trainable = 5 if finetune else 0
    mean, std = NORMALIZATIONS[norm]
    common = dict(min_size=image_size, max_size=image_size, image_mean=list(mean), image_std=list(std))
    if kind == "fasterrcnn":
        backbone = _resnet_fpn_extractor(body, trainable)
        sizes = _anchor_sizes(image_size, 5, 32)
        anchors = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes))
        # Fewer proposals and sampled RoIs than torchvision's defaults (2000 / 1000 proposals, 512 RoIs
        # per image): the RoI head's 12544 -> 1024 layer dominates CPU time and a chest X-ray holds at
        # most a handful of objects. 64 RoIs per image is the Fast R-CNN setting; 150 test proposals
        # (vs 300) make evaluation at 128 px ~1.7x faster on CPU.
        return FasterRCNN(backbone, num_classes=num_classes, rpn_anchor_generator=anchors,
                          rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
                          rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=150,
                          box_batch_size_per_image=64, box_score_thresh=0.001, box_detections_per_img=100,
                          **common)
    backbone = _resnet_fpn_extractor(body, trainable, returned_layers=[2, 3, 4],
                                     extra_blocks=LastLevelP6P7(256, 256))
    sizes = _anchor_sizes(image_size, 5, 32)
    anchors = AnchorGenerator(tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes),
                              ((0.5, 1.0, 2.0),) * len(sizes))
    return RetinaNet(backbone, num_classes=num_classes, anchor_generator=anchors, score_thresh=0.001,
                     detections_per_img=100, **common)


def _det_images(img: torch.Tensor, device: str) -> list[torch.Tensor]:
    # torchvision's transform normalises itself: give it [0, 1] three-channel images
    x = img.to(device).float().div(255.0)
    return [t.unsqueeze(0).expand(3, -1, -1) for t in x]


@torch.no_grad()
def evaluate_detector(model: nn.Module, ds: DetDataset, settings: TrainSettings) -> dict:
    """mAP metrics (``metrics.DetectionAccumulator``) of ``model`` on ``ds``, in resized pixels."""
    model.eval()
    acc = metrics.DetectionAccumulator()
    for img, targets in _loader(ds, settings, False, collate=collate_det):
        out = model(_det_images(img, settings.device))
        acc.update([{k: v.cpu() for k, v in o.items()} for o in out], targets)
    return acc.compute()


def train_detector(model: nn.Module, train_ds: DetDataset, val_ds: DetDataset, settings: TrainSettings
                   ) -> FitResult:
    model.to(settings.device)
    opt = _optimizer(model, settings)
    params = [p for p in model.parameters() if p.requires_grad]
    loader = _loader(train_ds, settings, shuffle=True, collate=collate_det)
    frozen = [model.backbone.body] if not any(p.requires_grad for p in model.backbone.body.parameters()) else []

    def train_epoch(epoch: int) -> float:
        train_ds.set_epoch(epoch)
        _set_train(model, frozen)
        total, n = 0.0, 0
        for img, targets in progress(loader, total=len(loader), desc=f"det epoch {epoch}", unit="batch"):
            targets = [{k: v.to(settings.device) for k, v in t.items()} for t in targets]
            losses = model(_det_images(img, settings.device), targets)
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            # detection losses spike early (few positives, random heads); clipping keeps AdamW stable
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            total, n = total + loss.item() * len(img), n + len(img)
        return total / max(n, 1)

    return fit(model, train_epoch, lambda: evaluate_detector(model, val_ds, settings), "map_40_75",
               settings, "det")
