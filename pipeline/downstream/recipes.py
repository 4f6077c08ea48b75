"""The training recipes of the two downstream protocols, ``mgca`` and ``tool`` (docs/PROTOCOLS.md).

``resolve(...)`` turns (protocol, task, dataset, fraction, ...) plus the values a user gave explicitly
into one ``Recipe``: every setting a seed's training and evaluation follow, recorded in results.json.
Explicit values always win over the protocol's defaults. A trained task's own defaults per protocol are its
``Task.recipe`` (and ``Task.primary``, the metric heading its tables), beside its head in its module; the
rules across tasks (normalisation, what early stopping monitors, BatchNorm, crops) are here.

The ``mgca`` values come from HKU-MedAI/MGCA (commit 680fe4a):
- linear probe: mgca/models/mgca/mgca_finetuner.py (batch 48, 50 epochs, EarlyStopping/ModelCheckpoint on
  val_loss, patience 10), mgca/models/ssl_finetuner.py (AdamW lr 5e-4, wd 1e-6, frozen backbone in eval
  mode, raw pooled features into one Linear), mgca/datasets/transforms.py (Moco2Transform for CheXpert,
  DataTransforms' RandomCrop(224) for the others, CenterCrop(224) at test, Normalize 0.5/0.5),
  mgca/datasets/utils.py (resize_img: long side to 256 with INTER_AREA, zero-padded square),
  mgca/datasets/data_module.py (shuffled training batches, last incomplete one dropped);
- segmentation: mgca/models/mgca/mgca_segmenter.py (smp Unet, frozen encoder parameters, wd 0.05, 50
  epochs, patience 10 on val_loss), run_seg_finetune.sh (lr 5e-4; batch 8 SIIM, 16 RSNA),
  mgca/utils/segmentation_loss.py (10 x focal - log(Dice)), mgca/datasets/segmentation_dataset.py
  (ShiftScaleRotate(shift_limit=0, scale_limit=0.1, rotate_limit=10, p=0.5), Resize(224), area-averaged
  soft masks);
- detection: mgca/models/mgca/mgca_detector.py (batch 16, lr 5e-4, wd 1e-6, 50 epochs, patience 10 on
  val_mAP), run_det_finetune.sh (at 1%: batch 8 with lr 2e-4 RSNA / 2.5e-4 Object-CXR),
  mgca/datasets/detection_dataset.py + transforms.DetectionDataTransforms (cv2 INTER_LINEAR resize to
  224, no augmentation, Normalize 0.5/0.5).
"""
from __future__ import annotations

import dataclasses

from pipeline.downstream import get_task
from pipeline.downstream.det_heads import DET_HEADS

PROTOCOLS = ("mgca", "tool")
NORMALIZE = ("auto", "imagenet", "half")
# MGCA's classification loads images at 256 and crops 224: the stored size is the input size x 8/7.
MGCA_CLS_LOAD = 256 / 224
ONE_PERCENT = 0.01 + 1e-9  # MGCA's run_det_finetune.sh gives its 1% runs their own batch size and lr


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything a seed's training and evaluation follow (see ``resolve``)."""

    protocol: str
    task: str
    epochs: int
    patience: int
    lr: float
    batch_size: int
    weight_decay: float
    image_size: int          # the network input, image_size x image_size
    load_size: int           # the stored square the crops are cut from (= image_size without crops)
    resize: str              # stretch | pad (data.RESIZES)
    resample: str            # antialias | area | linear (data.RESAMPLES)
    train_transform: str     # data.TRANSFORMS
    eval_transform: str
    normalize: str           # imagenet | half
    monitor: str             # the validation value early stopping follows
    mode: str                # max | min
    primary: str             # the test metric that heads the table
    grad_clip: float | None
    drop_last: bool
    frozen_encoder: bool
    encoder_bn: str          # "fixed": BN statistics never change; "train": they adapt during training
    head: str
    loss: str
    features: str            # cls: "cached" (once per image, standardised) | "per-epoch" (raw) | "finetuned"
    soft_masks: bool         # seg: train on each pixel's covered share instead of the thresholded mask

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# The values every task of a protocol starts from; each trained task's ``Task.recipe`` adds its own (the
# task modules say where MGCA's values come from).
TOOL_COMMON = dict(batch_size=16, weight_decay=1e-4, resize="stretch", resample="antialias", eval_transform="none",
                   grad_clip=None, drop_last=False, soft_masks=False)
MGCA_COMMON = dict(epochs=50, patience=10, grad_clip=None, drop_last=True, soft_masks=False, eval_transform="none",
                   resize="stretch", resample="linear")


def resolve(protocol: str, task: str, dataset: str, fraction: float, finetune: bool, init: str,
            label_kind: str = "multilabel", *, epochs: int | None = None, patience: int | None = None,
            lr: float | None = None, batch_size: int | None = None, weight_decay: float | None = None,
            image_size: int = 224, normalize: str = "auto", det_model: str | None = None) -> Recipe:
    """The recipe of ``protocol`` for this run, with every explicitly given value (not None / "auto")
    taking precedence over the protocol's default."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    task_impl = get_task(task)
    base = task_impl.recipe(protocol, finetune, dataset, fraction)
    given = dict(epochs=epochs, patience=patience, lr=lr, batch_size=batch_size, weight_decay=weight_decay)
    base.update({k: v for k, v in given.items() if v is not None})
    if task == "det" and det_model is not None:
        base["head"] = det_model
    if normalize == "auto":
        # MGCA normalises every encoder's input with mean/std 0.5; this tool uses ImageNet statistics for
        # ImageNet weights and 0.5 for the others (what M-FLAG, MGCA and GLoRIA pre-trained with)
        normalize = "half" if protocol == "mgca" or init != "imagenet" else "imagenet"
    primary = task_impl.primary(protocol, label_kind)
    if protocol == "mgca" and task != "det":
        monitor, mode = "loss", "min"
    else:
        monitor, mode = primary, "max"
    crops = base["eval_transform"] == "center-crop"
    frozen = not finetune
    # the BN statistics of a frozen encoder stay fixed, except in MGCA's seg recipe, whose frozen encoder runs
    # in training mode; a detection head decides for itself (det_heads.DetHeadEntry.frozen_bn): torchvision's
    # bodies use FrozenBatchNorm2d, fine-tuned or not, the YOLOv3 head's BN follows the model's mode
    if task == "det":
        bn_train = not DET_HEADS[base["head"]].frozen_bn
    else:
        bn_train = not frozen or (protocol == "mgca" and task == "seg")
    return Recipe(protocol=protocol, task=task, image_size=image_size,
                  load_size=int(round(image_size * MGCA_CLS_LOAD)) if crops else image_size,
                  normalize=normalize, monitor=monitor, mode=mode, primary=primary, frozen_encoder=frozen,
                  encoder_bn="train" if bn_train else "fixed", **base)
