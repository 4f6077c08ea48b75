"""Segmentation: an smp U-Net whose ResNet50 encoder holds the evaluated weights.

Without ``--finetune`` the encoder's parameters are frozen. Its BatchNorm statistics stay fixed
under ``tool`` and adapt under ``mgca`` (MGCA freezes only the parameters and trains the module in
training mode). Losses: ``tool`` BCE + per-image soft Dice on the thresholded mask; ``mgca`` MGCA's
``MixedLoss``: 10 x focal (gamma 2) - log(soft Dice over the whole batch), on the soft
(area-averaged) mask.

Predictions file (``seed-N.predictions.json``): ``{"format": "mflag-seg-predictions/1", "image_size": S,
"resize", "threshold": 0.5, "images": [{"image_id", "height", "width", "pred": RLE, "truth": RLE}]}``,
masks at the S x S network input (the prediction is the sigmoid thresholded at 0.5, the truth the
stored mask covered at least half), each a COCO run-length encoding (``pycocotools.mask.encode`` of
the Fortran-ordered uint8 mask; ``counts`` as text): ``pycocotools.mask.decode`` gives the masks back.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.common import MflagError, progress, write_json
from pipeline.downstream import metrics
from pipeline.downstream.data import MASK_ON, SegDataset
from pipeline.downstream.loop import (
    TrainSettings,
    fit,
    freeze,
    frozen_bn_mode,
    images_in,
    make_loader,
    place,
    to_device,
)
from pipeline.downstream.recipes import MGCA_COMMON, TOOL_COMMON
from pipeline.downstream.task import SeedOutcome, SeedRun, Task

PREDICTIONS_FORMAT = "mflag-seg-predictions/1"


def build_unet(encoder_state: dict, finetune: bool) -> nn.Module:
    """smp U-Net with a ResNet50 encoder holding ``encoder_state`` (torchvision keys, no ``fc``).

    Loading is strict; without ``finetune`` the encoder's parameters are frozen.
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


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """This tool's loss: BCE plus soft Dice (per image, so small lesions weigh as much as large ones)."""
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce + dice.mean()


def mgca_focal(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """MGCA's FocalLoss (mgca/utils/segmentation_loss.py): the logits' BCE weighted by
    sigmoid(-x (2t - 1))^gamma, averaged over pixels. For 0/1 targets it is torchvision's
    ``sigmoid_focal_loss`` without alpha; for soft targets it follows MGCA's formula."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (torch.exp(gamma * F.logsigmoid(-logits * (target * 2.0 - 1.0))) * bce).mean()


def mgca_mixed_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 10.0) -> torch.Tensor:
    """MGCA's MixedLoss: alpha x focal - log(Dice), Dice = (2 sum(p t) + 1) / (sum p + sum t + 1) over
    every pixel of the batch."""
    target = target.float()
    p = logits.sigmoid().reshape(-1)
    t = target.reshape(-1)
    dice = (2.0 * (p * t).sum() + 1.0) / (p.sum() + t.sum() + 1.0)
    return alpha * mgca_focal(logits, target) - torch.log(dice)


def mask_target(mask_u8: torch.Tensor, soft: bool) -> torch.Tensor:
    """The training target of a stored mask: its covered share (soft) or covered at least half."""
    return mask_u8.float() / 255.0 if soft else (mask_u8 > MASK_ON).float()


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, ds: SegDataset, settings: TrainSettings, loss_fn=bce_dice_loss,
                       soft: bool = False, keep: bool = False) -> tuple[dict, list | None]:
    """(Dice metrics of ``metrics.DiceAccumulator`` and the mean loss, [(predicted, true) bool masks] per
    image when ``keep``) of ``model`` on ``ds``."""
    model.eval()
    acc = metrics.DiceAccumulator()
    kept = [] if keep else None
    total, n = 0.0, 0
    loader = make_loader(ds, settings, False)
    for img, mask in progress(loader, total=len(loader), desc="seg eval", unit="batch"):
        logits = model(images_in(img, settings))[:, 0].float()
        mask = to_device(mask, settings)
        total, n = total + float(loss_fn(logits, mask_target(mask, soft))) * len(img), n + len(img)
        pred, truth = (logits.sigmoid() > 0.5).cpu(), (mask > MASK_ON).cpu()
        acc.update(pred, truth)
        if keep:
            kept.extend(zip(pred.numpy(), truth.numpy()))
    res = acc.compute()
    res["loss"] = total / max(n, 1)
    return res, kept


class SegTask(Task):
    name = "seg"
    predictions_suffix = ".json"
    predictions_format = ("JSON, per test image: image_id, original height/width, predicted and true masks at the "
                          "network input size as COCO run-length encodings (pycocotools.mask)")

    def recipe(self, protocol: str, finetune: bool, dataset: str, fraction: float) -> dict:
        if protocol == "mgca":  # mgca_segmenter.py, run_seg_finetune.sh, segmentation_loss.py (recipes.py)
            return dict(MGCA_COMMON, batch_size=16 if dataset == "rsna" else 8, lr=5e-4, weight_decay=0.05,
                        train_transform="shift-scale-rotate", features="", head="smp Unet(resnet50)",
                        loss="10 x focal(gamma 2) - log(batch soft dice)", soft_masks=True)
        return dict(TOOL_COMMON, epochs=10, patience=3, lr=1e-4 if finetune else 3e-4, train_transform="mild",
                    features="", head="smp Unet(resnet50)", loss="bce + per-image soft dice")

    def primary(self, protocol: str, label_kind: str) -> str:
        return "dice"

    def check(self, spec) -> None:
        super().check(spec)
        if spec.mask_fn is None:
            raise MflagError(f"dataset {spec.name} has no segmentation masks")

    def needs_masks(self) -> bool:
        return True

    def run(self, r: SeedRun) -> SeedOutcome:
        s, rec = r.settings, r.recipe
        torch.manual_seed(s.seed)
        model = place(build_unet(r.encoder.state_dict(), finetune=not rec.frozen_encoder), s)
        loss_fn = mgca_mixed_loss if rec.loss.startswith("10 x focal") else bce_dice_loss
        train_t, eval_t = r.transforms()
        train = SegDataset(r.source, r.train_idx, transform=train_t, seed=r.seed)
        val = SegDataset(r.source, r.val_idx, transform=eval_t)
        mode = frozen_bn_mode(model, [model.encoder]) if rec.encoder_bn == "fixed" else model.train

        def step(batch):
            img, mask = batch
            logits = model(images_in(img, s))[:, 0]
            return loss_fn(logits, mask_target(to_device(mask, s), rec.soft_masks)), len(img)

        fitted = fit(model, make_loader(train, s, shuffle=True, train=True), step,
                     lambda: evaluate_segmenter(model, val, s, loss_fn, rec.soft_masks)[0], s, "seg", mode)
        test, masks = evaluate_segmenter(model, SegDataset(r.source, r.test_idx, transform=eval_t), s, loss_fn,
                                         rec.soft_masks, keep=True)
        test.pop("loss", None)
        return SeedOutcome(fitted, test, {"ids": r.ids(r.test_idx), "masks": masks,
                                          "sizes": [r.source.orig_size(i) for i in r.test_idx]})

    def write_predictions(self, path: Path, outcome: SeedOutcome, run: SeedRun) -> None:
        p = outcome.predictions
        images = [{"image_id": i, "height": int(hw[0]), "width": int(hw[1]), "pred": rle_encode(pm),
                   "truth": rle_encode(tm)} for i, hw, (pm, tm) in zip(p["ids"], p["sizes"], p["masks"])]
        write_json(path, {"format": PREDICTIONS_FORMAT, "image_size": run.recipe.image_size,
                          "resize": run.recipe.resize, "threshold": 0.5, "images": images})


def rle_encode(mask: np.ndarray) -> dict:
    """COCO RLE of a 2-D boolean mask: ``{"size": [h, w], "counts": str}``."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_decode(rle: dict) -> np.ndarray:
    """The boolean mask of ``rle_encode``'s output."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


TASK = SegTask()
