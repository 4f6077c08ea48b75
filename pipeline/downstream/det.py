"""Detection: a registry of heads on the evaluated ResNet50, trained and tested with one loop.

Every head follows torchvision's detection call convention: ``model(list of [0, 1] 3 x S x S images,
targets) -> dict of losses`` in training, ``model(images) -> [{boxes, scores, labels}]`` in eval
mode, so the same step and evaluation drive them all. Heads (declared in ``pipeline.downstream.det_heads``):
- ``fasterrcnn``, ``retinanet``: torchvision's, on a ResNet50 + FPN body (``BackboneWithFPN``) with
  frozen BatchNorm (torchvision's detection convention); without ``--finetune`` the body's weights
  are frozen too, with it all five stages train.
- ``yolov3``: MGCA's YOLOv3 head on C3-C5 (``pipeline.downstream.yolov3``; the default under ``--protocol mgca``):
  frozen ResNet50 weights, BatchNorm statistics adapting in training (MGCA's recipe); image sizes must
  be multiples of 32.

Predictions file (``seed-N.predictions.json``): ``{"format": "mflag-det-predictions/1", "image_size": S,
"images": [{"image_id", "height", "width", "boxes", "scores", "labels", "truth"}]}``: per test image
every box the head returned (x1, y1, x2, y2 in pixels of the S x S network input, after its NMS,
scores from its low threshold up) and the ground-truth boxes in the same frame. A box (x, y) maps to
the original image as (x * width / S, y * height / S). pycocotools' COCOeval with IoU thresholds
0.40:0.75 on these lists gives ``map_40_75``.
"""
from __future__ import annotations

import importlib
import operator
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline.common import MflagError, progress, write_json
from pipeline.downstream import metrics
from pipeline.downstream.data import NORMALIZATIONS, DetDataset, collate_det
from pipeline.downstream.det_heads import DET_HEADS
from pipeline.downstream.loop import TrainSettings, fit, frozen_bn_mode, make_loader, place, to_device
from pipeline.downstream.recipes import MGCA_COMMON, ONE_PERCENT, TOOL_COMMON
from pipeline.downstream.task import SeedOutcome, SeedRun, Task
from pipeline.downstream.yolov3 import build_yolov3

PREDICTIONS_FORMAT = "mflag-det-predictions/1"


def _anchor_sizes(image_size: int, n_levels: int, first: int) -> tuple[int, ...]:
    # torchvision's defaults (32..512 px) are tuned for ~800 px inputs; scale them with the image so
    # small CPU-sized inputs still have anchors that fit their objects.
    scale = min(1.0, image_size / 512)
    return tuple(max(4, int(round(first * 2 ** i * scale))) for i in range(n_levels))


def resnet_fpn(encoder_state: dict, trainable_layers: int, returned_layers: list[int], extra_blocks=None):
    """A ResNet50 body with frozen BatchNorm holding ``encoder_state`` under torchvision's public
    ``BackboneWithFPN`` (256 channels). The ``trainable_layers`` last stages (0-5, as torchvision counts
    them) keep gradients; the rest is frozen."""
    import torchvision
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops import FrozenBatchNorm2d

    body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    state = {k: v for k, v in encoder_state.items() if not k.startswith("fc.")}
    missing, unexpected = body.load_state_dict(state, strict=False)
    # FrozenBatchNorm2d has no num_batches_tracked buffer, and fc is not used; everything else must match.
    missing = [k for k in missing if not k.startswith("fc.")]
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise MflagError(f"encoder weights do not fit the detection ResNet50 body: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        train.append("bn1")
    for name, p in body.named_parameters():
        p.requires_grad_(any(name.startswith(t) for t in train))
    return_layers = {f"layer{k}": str(v) for v, k in enumerate(returned_layers)}
    in_channels = [256 * 2 ** (k - 1) for k in returned_layers]
    return BackboneWithFPN(body, return_layers, in_channels, 256, extra_blocks=extra_blocks)


def build_fasterrcnn(encoder_state: dict, image_size: int, finetune: bool, norm: str, num_classes: int = 2):
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    backbone = resnet_fpn(encoder_state, 5 if finetune else 0, [1, 2, 3, 4])
    sizes = _anchor_sizes(image_size, 5, 32)
    anchors = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes))
    mean, std = NORMALIZATIONS[norm]
    # Fewer proposals and sampled RoIs than torchvision's defaults (2000 / 1000 proposals, 512 RoIs per
    # image): the RoI head's 12544 -> 1024 layer dominates CPU time and a chest X-ray holds at most a
    # handful of objects. 64 RoIs per image is the Fast R-CNN setting; 150 test proposals (vs 300) make
    # evaluation at 128 px ~1.7x faster on CPU.
    return FasterRCNN(backbone, num_classes=num_classes, rpn_anchor_generator=anchors,
                      rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
                      rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=150,
                      box_batch_size_per_image=64, box_score_thresh=0.001, box_detections_per_img=100,
                      min_size=image_size, max_size=image_size, image_mean=list(mean), image_std=list(std))


def build_retinanet(encoder_state: dict, image_size: int, finetune: bool, norm: str, num_classes: int = 2):
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    backbone = resnet_fpn(encoder_state, 5 if finetune else 0, [2, 3, 4], LastLevelP6P7(256, 256))
    sizes = _anchor_sizes(image_size, 5, 32)
    anchors = AnchorGenerator(tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes),
                              ((0.5, 1.0, 2.0),) * len(sizes))
    mean, std = NORMALIZATIONS[norm]
    return RetinaNet(backbone, num_classes=num_classes, anchor_generator=anchors, score_thresh=0.001,
                     detections_per_img=100, min_size=image_size, max_size=image_size, image_mean=list(mean),
                     image_std=list(std))


def build_yolo(encoder_state: dict, image_size: int, finetune: bool, norm: str):
    """MGCA's YOLOv3 head on C3-C5 (``pipeline.downstream.yolov3``): its ResNet50 is frozen, BatchNorm following the
    model's mode; ``finetune`` makes the ResNet50's weights trainable too."""
    model = build_yolov3(encoder_state, image_size, num_classes=1, norm=norm)
    if finetune:
        for p in model.backbone.parameters():
            p.requires_grad_(True)
    return model


def head_builder(kind: str) -> Callable[..., nn.Module]:
    """The function building ``DET_HEADS[kind]``'s model (its ``build``, ``"module:function"``)."""
    module, _, name = DET_HEADS[kind].build.partition(":")
    return getattr(importlib.import_module(module), name)


def head_body(kind: str, model: nn.Module) -> nn.Module:
    """The ResNet50 inside ``DET_HEADS[kind]``'s ``model``."""
    return operator.attrgetter(DET_HEADS[kind].body)(model)


def build_detector(kind: str, encoder_state: dict, image_size: int, finetune: bool, norm: str = "imagenet"
                   ) -> nn.Module:
    """The ``DET_HEADS[kind]`` model holding ``encoder_state``; inputs [0, 1] images of ``image_size``,
    normalised inside with ``NORMALIZATIONS[norm]``."""
    if kind not in DET_HEADS:
        raise MflagError(f"unknown detection model {kind!r}; choose one of {', '.join(DET_HEADS)}")
    return head_builder(kind)(encoder_state, image_size, finetune, norm)


def det_images(img: torch.Tensor, settings: TrainSettings) -> list[torch.Tensor]:
    """A uint8 B x S x S batch as the list of [0, 1] three-channel images the heads take (they
    normalise themselves)."""
    x = to_device(img, settings).float().div(255.0)
    return [t.unsqueeze(0).expand(3, -1, -1) for t in x]


@torch.no_grad()
def evaluate_detector(model: nn.Module, ds: DetDataset, settings: TrainSettings, keep: bool = False
                      ) -> tuple[dict, list | None]:
    """(mAP metrics of ``metrics.DetectionAccumulator``, [(prediction, target)] per image when ``keep``)
    of ``model`` on ``ds``, in stored pixels."""
    model.eval()
    acc = metrics.DetectionAccumulator()
    kept = [] if keep else None
    loader = make_loader(ds, settings, False, collate=collate_det)
    for img, targets in progress(loader, total=len(loader), desc="det eval", unit="batch"):
        out = [{k: v.float().cpu() if k != "labels" else v.cpu() for k, v in o.items()}
               for o in model(det_images(img, settings))]
        acc.update(out, targets)
        if keep:
            kept.extend(zip(out, targets))
    return acc.compute(), kept


class DetTask(Task):
    name = "det"
    predictions_suffix = ".json"
    predictions_format = ("JSON, per test image: image_id, original height/width, the head's boxes (x1 y1 x2 y2 in "
                          "network-input pixels), scores and labels after its NMS, and the ground-truth boxes")

    def recipe(self, protocol: str, finetune: bool, dataset: str, fraction: float) -> dict:
        if protocol == "mgca":  # mgca_detector.py, run_det_finetune.sh (recipes.py)
            one = fraction <= ONE_PERCENT
            return dict(MGCA_COMMON, batch_size=8 if one else 16,
                        lr=({"rsna": 2e-4, "object-cxr": 2.5e-4}.get(dataset, 5e-4) if one else 5e-4),
                        weight_decay=1e-6, train_transform="none", features="", head="yolov3", loss="the head's own")
        # detection losses spike early (few positives, random heads); clipping keeps AdamW stable
        return dict(TOOL_COMMON, epochs=10, patience=3, lr=1e-4, train_transform="photometric", features="",
                    head="fasterrcnn", loss="the head's own", grad_clip=10.0)

    def primary(self, protocol: str, label_kind: str) -> str:
        return "map_40_75_mgca" if protocol == "mgca" else "map_40_75"

    def run(self, r: SeedRun) -> SeedOutcome:
        s, rec = r.settings, r.recipe
        torch.manual_seed(s.seed)
        model = place(build_detector(rec.head, r.encoder.state_dict(), rec.image_size, not rec.frozen_encoder,
                                     rec.normalize), s, conv=False)
        train_t, eval_t = r.transforms()
        train = DetDataset(r.source, r.train_idx, transform=train_t, seed=r.seed)
        val = DetDataset(r.source, r.val_idx, transform=eval_t)
        mode = frozen_bn_mode(model, [head_body(rec.head, model)]) if rec.encoder_bn == "fixed" else model.train

        def step(batch):
            img, targets = batch
            targets = [{k: to_device(v, s) for k, v in t.items()} for t in targets]
            losses = model(det_images(img, s), targets)
            return sum(losses.values()), len(img)

        fitted = fit(model, make_loader(train, s, shuffle=True, collate=collate_det, train=True), step,
                     lambda: evaluate_detector(model, val, s)[0], s, "det", mode)
        test, pairs = evaluate_detector(model, DetDataset(r.source, r.test_idx, transform=eval_t), s, keep=True)
        return SeedOutcome(fitted, test, {"ids": r.ids(r.test_idx), "pairs": pairs,
                                          "sizes": [r.source.orig_size(i) for i in r.test_idx]})

    def write_predictions(self, path: Path, outcome: SeedOutcome, run: SeedRun) -> None:
        p = outcome.predictions
        images = [{"image_id": i, "height": int(hw[0]), "width": int(hw[1]),
                   "boxes": pred["boxes"].reshape(-1, 4).tolist(), "scores": pred["scores"].tolist(),
                   "labels": [int(v) for v in pred["labels"].tolist()],
                   "truth": target["boxes"].reshape(-1, 4).tolist()}
                  for i, hw, (pred, target) in zip(p["ids"], p["sizes"], p["pairs"])]
        write_json(path, {"format": PREDICTIONS_FORMAT, "image_size": run.recipe.image_size, "images": images})


TASK = DetTask()
