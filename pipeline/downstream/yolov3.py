"""MGCA's YOLOv3 detection head on a frozen ResNet50, behind torchvision's detection call convention.

The same loop that drives torchvision's Faster R-CNN and RetinaNet drives this model:

- ``model.train(); losses = model(images, targets)``: ``images`` a list of 3 x S x S float tensors in
  [0, 1] (or one B x 3 x S x S tensor), ``targets`` a list of dicts with ``boxes`` (K x 4 xyxy pixels,
  K may be 0) and ``labels`` (K int64, 1-based). Returns ``loss_xy``, ``loss_wh``, ``loss_obj`` and
  ``loss_cls``, already weighted: their sum is MGCA's loss.
- ``model.eval(); preds = model(images)``: one dict per image with ``boxes`` (N x 4 xyxy pixels),
  ``scores`` (N, the objectness) and ``labels`` (N int64, 1-based), after NMS at IoU 0.5 with a low
  score threshold (``SCORE_THRESH``) and at most ``MAX_DETECTIONS`` boxes, so that a COCO-style mAP sees
  the whole precision/recall curve. MGCA's own metric keeps only scores >= 0.5
  (``pipeline.downstream.metrics.detection_map_mgca``).

Architecture, anchors, loss and decoding follow MGCA (HKU-MedAI/MGCA: ``mgca/models/ssl_detector.py``,
``mgca/models/backbones/detector_backbone.py``, ``mgca/utils/yolo_loss.py``); docs/PROTOCOLS.md,
"Detection head and mAP", lists each fact with its source and the oddities reproduced here.

The ResNet50 is frozen (``requires_grad`` False) but its BatchNorm layers follow the model's mode, as
in MGCA's Lightning module: ``model.train()`` lets their running statistics adapt to the detection
images, ``model.eval()`` uses them. A training loop must therefore not put ``model.backbone`` into eval
mode while training.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.common import MflagError

# MGCA's anchors (w, h) in pixels of a 416 px input (the YOLOv3 COCO anchors), one row of three per
# output scale, coarsest first; MGCA multiplies them by 224 / 416 for its 224 px input, here by
# image_size / 416.
MGCA_ANCHORS_416 = (
    ((116, 90), (156, 198), (373, 326)),  # stride 32, on C5 (layer4)
    ((30, 61), (62, 45), (59, 119)),  # stride 16, on C4 (layer3)
    ((10, 13), (16, 30), (33, 23)),  # stride 8, on C3 (layer2)
)
STRIDES = (32, 16, 8)
# MGCA's YOLOLoss weights: 2.5 for the centre (BCE) and size (MSE) terms, 1 for objectness and class;
# no-object cells weigh 0.5 inside the objectness term.
LAMBDA_XY = 2.5
LAMBDA_WH = 2.5
LAMBDA_OBJ = 1.0
LAMBDA_CLS = 1.0
NOOBJ_WEIGHT = 0.5
# A no-object penalty is waived at a ground truth's cell for anchors whose shape IoU with it is over this.
IGNORE_IOU = 0.5
NMS_IOU = 0.5
# Low enough that mAP integrates the whole precision/recall curve (torchvision's detectors use 0.05;
# ours run at 0.001 like Faster R-CNN and RetinaNet in pipeline.downstream).
SCORE_THRESH = 0.001
MAX_DETECTIONS = 100
# exp() of an untrained size logit can overflow; torchvision clamps box deltas at log(1000 / 16) too.
_WH_LOGIT_CLIP = math.log(1000.0 / 16)

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# name -> (mean, std) per channel of [0, 1] inputs; the same names and values as the downstream heads'
# NORMALIZATIONS ("half" = M-FLAG, MGCA and this tool's train-vision; "imagenet" = torchvision weights).
NORMALIZATIONS = {"imagenet": _IMAGENET, "half": ((0.5,) * 3, (0.5,) * 3)}


def anchors_for(image_size: int) -> Tensor:
    """3 scales x 3 anchors x (w, h) in pixels of an ``image_size`` input (MGCA's, scaled by S / 416)."""
    return torch.tensor(MGCA_ANCHORS_416, dtype=torch.float32) * (image_size / 416.0)


def build_yolov3(encoder_state: dict[str, Tensor], image_size: int, num_classes: int = 1,
                 norm: str = "half") -> nn.Module:
    """MGCA's YOLOv3 head on a frozen torchvision ResNet50 holding ``encoder_state``.

    ``encoder_state``: a torchvision resnet50 state_dict without ``fc.*`` (what
    ``pipeline.vision.checkpoints.load_encoder_state`` returns); loading is strict. ``image_size``: the side S
    of the square inputs, a multiple of 32. ``num_classes``: foreground classes (labels 1..C).
    ``norm``: a key of ``NORMALIZATIONS``; the model normalises its [0, 1] inputs itself.
    """
    import torchvision

    if int(image_size) != image_size or image_size < 32 or image_size % 32:
        raise MflagError(f"yolov3: image_size must be a positive multiple of 32 (the C5 stride), "
                         f"got {image_size}")
    if num_classes < 1:
        raise MflagError(f"yolov3: num_classes must be at least 1, got {num_classes}")
    if norm not in NORMALIZATIONS:
        raise MflagError(f"yolov3: unknown normalisation {norm!r}; choose one of {', '.join(NORMALIZATIONS)}")
    resnet = torchvision.models.resnet50(weights=None)
    resnet.fc = nn.Identity()
    state = {k: v for k, v in encoder_state.items() if not k.startswith("fc.")}
    missing, unexpected = resnet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MflagError(f"encoder weights do not fit the YOLOv3 ResNet50 backbone: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return YOLOv3(resnet, int(image_size), int(num_classes), norm)


# --------------------------------------------------------------------------- the network
def _cbl(c_in: int, c_out: int, k: int) -> nn.Sequential:
    """conv (no bias) + BatchNorm + LeakyReLU(0.1), MGCA's building block."""
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(c_in, c_out, k, stride=1, padding=(k - 1) // 2, bias=False)),
        ("bn", nn.BatchNorm2d(c_out)),
        ("relu", nn.LeakyReLU(0.1)),
    ]))


class _Branch(nn.Module):
    """Five alternating 1x1 / 3x3 CBLs (the route to the next scale leaves after the fifth), one more
    3x3 CBL and a 1x1 output conv with A x (5 + C) channels."""

    def __init__(self, c_in: int, widths: tuple[int, int], c_out: int):
        super().__init__()
        narrow, wide = widths
        self.body = nn.Sequential(_cbl(c_in, narrow, 1), _cbl(narrow, wide, 3), _cbl(wide, narrow, 1),
                                  _cbl(narrow, wide, 3), _cbl(wide, narrow, 1))
        self.tail = _cbl(narrow, wide, 3)
        self.out = nn.Conv2d(wide, c_out, 1, bias=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        route = self.body(x)
        return self.out(self.tail(route)), route


class YOLOv3(nn.Module):
    """See the module docstring for the call convention; build it with ``build_yolov3``."""

    def __init__(self, resnet: nn.Module, image_size: int, num_classes: int, norm: str):
        super().__init__()
        from torchvision.models._utils import IntermediateLayerGetter

        self.image_size = image_size
        self.num_classes = num_classes
        self.norm = norm
        self.backbone = IntermediateLayerGetter(resnet, {"layer2": "c3", "layer3": "c4", "layer4": "c5"})
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        mean, std = NORMALIZATIONS[norm]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("anchors", anchors_for(image_size), persistent=False)  # 3 x 3 x 2 px
        n_out = self.anchors.shape[1] * (5 + num_classes)
        self.branch0 = _Branch(2048, (512, 1024), n_out)
        self.lateral1 = _cbl(512, 256, 1)
        self.branch1 = _Branch(1024 + 256, (256, 512), n_out)
        self.lateral2 = _cbl(256, 128, 1)
        self.branch2 = _Branch(512 + 128, (128, 256), n_out)

    # ---------------------------------------------------------------- forward
    def forward(self, images: Sequence[Tensor] | Tensor, targets: Sequence[dict] | None = None):
        x = self._stack(images)
        raw = self.raw_outputs(x)
        if self.training:
            if targets is None:
                raise MflagError("yolov3: training mode needs targets (call model.eval() to detect)")
            return self.loss(raw, targets)
        return self.detect(raw)

    def _stack(self, images: Sequence[Tensor] | Tensor) -> Tensor:
        x = images if isinstance(images, Tensor) else torch.stack(list(images)) if len(images) else None
        s = self.image_size
        if x is None or x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            shape = None if x is None else tuple(x.shape)
            raise MflagError(f"yolov3: expected a non-empty batch of 3 x {s} x {s} images in [0, 1], got {shape}")
        return (x.float() - self.mean) / self.std

    def raw_outputs(self, x: Tensor) -> list[Tensor]:
        """Normalised B x 3 x S x S -> the three raw maps B x A(5+C) x H x W, strides 32, 16, 8."""
        # No gradient has to reach a frozen backbone; its BN layers still update their statistics in
        # train mode (they do so in the forward pass).
        with torch.set_grad_enabled(torch.is_grad_enabled() and
                                    any(p.requires_grad for p in self.backbone.parameters())):
            feats = self.backbone(x)
        out0, route = self.branch0(feats["c5"])  # stride 32
        up = F.interpolate(self.lateral1(route), scale_factor=2, mode="nearest")
        out1, route = self.branch1(torch.cat([up, feats["c4"]], 1))  # stride 16
        up = F.interpolate(self.lateral2(route), scale_factor=2, mode="nearest")
        out2, _ = self.branch2(torch.cat([up, feats["c3"]], 1))  # stride 8
        return [out0, out1, out2]

    def _split(self, raw: Tensor) -> Tensor:
        b, _, h, w = raw.shape
        # B x A(5+C) x H x W -> B x A x H x W x (5+C): x, y, w, h, objectness, classes
        return raw.view(b, self.anchors.shape[1], 5 + self.num_classes, h, w).permute(0, 1, 3, 4, 2)

    # ---------------------------------------------------------------- training
    def loss(self, raw: list[Tensor], targets: Sequence[dict]) -> dict[str, Tensor]:
        """MGCA's YOLO loss summed over the three scales, weighted, as a dict of four scalars."""
        if len(targets) != raw[0].shape[0]:
            raise MflagError(f"yolov3: {len(targets)} targets for {raw[0].shape[0]} images")
        boxes, cls, img = self._gather_targets(targets, raw[0].device)
        total = {"loss_xy": 0.0, "loss_wh": 0.0, "loss_obj": 0.0, "loss_cls": 0.0}
        for level, r in enumerate(raw):
            terms = yolo_level_loss(self._split(r), boxes, cls, img, self.anchors[level],
                                    self.image_size / r.shape[-1], self.num_classes)
            total["loss_xy"] = total["loss_xy"] + LAMBDA_XY * (terms["x"] + terms["y"])
            total["loss_wh"] = total["loss_wh"] + LAMBDA_WH * (terms["w"] + terms["h"])
            total["loss_obj"] = total["loss_obj"] + LAMBDA_OBJ * terms["obj"]
            total["loss_cls"] = total["loss_cls"] + LAMBDA_CLS * terms["cls"]
        return total

    def _gather_targets(self, targets: Sequence[dict], device) -> tuple[Tensor, Tensor, Tensor]:
        """All ground-truth boxes of the batch (K x 4 xyxy px), their 0-based classes and image indices,
        in image order then box order (MGCA's order, which decides overwrites in a shared cell)."""
        s = self.image_size
        all_boxes, all_cls, all_img = [], [], []
        for i, t in enumerate(targets):
            b = torch.as_tensor(t["boxes"], dtype=torch.float32, device=device).reshape(-1, 4)
            lab = torch.as_tensor(t["labels"], device=device).reshape(-1).long()
            if len(lab) != len(b):
                raise MflagError(f"yolov3: target {i} has {len(b)} boxes and {len(lab)} labels")
            if len(b):
                if not torch.isfinite(b).all() or ((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])).any():
                    raise MflagError(f"yolov3: target {i} has a degenerate or non-finite box: {b.tolist()}")
                cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
                if ((cx < 0) | (cx > s) | (cy < 0) | (cy > s)).any():
                    raise MflagError(f"yolov3: target {i} has a box centre outside the {s} x {s} image: "
                                     f"{b.tolist()}")
                if ((lab < 1) | (lab > self.num_classes)).any():
                    raise MflagError(f"yolov3: target {i} has labels {lab.tolist()}; expected 1..{self.num_classes}")
            all_boxes.append(b)
            all_cls.append(lab - 1)
            all_img.append(torch.full((len(b),), i, dtype=torch.long, device=device))
        return torch.cat(all_boxes), torch.cat(all_cls), torch.cat(all_img)

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def decode(self, raw: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Every anchor's box before any filtering: B x N x 4 xyxy pixels, B x N objectness and
        B x N x C class probabilities, N = 3 x sum(H x W) over the scales (MGCA's decoding: centre =
        (sigmoid + cell) x stride, size = exp(logit) x anchor)."""
        boxes, obj, cls_prob = [], [], []
        for level, r in enumerate(raw):
            p = self._split(r)
            b, a, h, w, _ = p.shape
            stride = self.image_size / w
            gy, gx = torch.meshgrid(torch.arange(h, device=r.device), torch.arange(w, device=r.device),
                                    indexing="ij")
            cx = (p[..., 0].sigmoid() + gx) * stride
            cy = (p[..., 1].sigmoid() + gy) * stride
            anchors = self.anchors[level].to(r.device)
            bw = p[..., 2].clamp(max=_WH_LOGIT_CLIP).exp() * anchors[:, 0].view(1, a, 1, 1)
            bh = p[..., 3].clamp(max=_WH_LOGIT_CLIP).exp() * anchors[:, 1].view(1, a, 1, 1)
            boxes.append(torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1).reshape(b, -1, 4))
            obj.append(p[..., 4].sigmoid().reshape(b, -1))
            cls_prob.append(p[..., 5:].sigmoid().reshape(b, -1, self.num_classes))
        return torch.cat(boxes, 1).float(), torch.cat(obj, 1).float(), torch.cat(cls_prob, 1).float()

    @torch.no_grad()
    def detect(self, raw: list[Tensor]) -> list[dict[str, Tensor]]:
        """Decoded boxes per image after class-wise NMS at ``NMS_IOU``, scores >= ``SCORE_THRESH``,
        at most ``MAX_DETECTIONS``; boxes are not clipped to the image (MGCA does not clip either)."""
        from torchvision.ops import batched_nms

        boxes, obj, cls_prob = self.decode(raw)
        out = []
        for i in range(len(boxes)):
            # MGCA scores a box by its objectness alone and labels it with its most probable class
            keep = obj[i] >= SCORE_THRESH
            bx, sc, lab = boxes[i][keep], obj[i][keep], cls_prob[i][keep].argmax(-1)
            # NMS before the score cut: greedy NMS visits boxes by falling score and a box is removed
            # only by a kept box that scores higher, so boxes over any cut t survive exactly as they
            # would if boxes under t had never been there; thresholding our output at 0.5 therefore
            # equals MGCA's threshold-then-NMS (tests/test_yolov3.py checks this).
            kept = batched_nms(bx, sc, lab, NMS_IOU)[:MAX_DETECTIONS]
            out.append({"boxes": bx[kept], "scores": sc[kept], "labels": lab[kept] + 1})
        return out


# --------------------------------------------------------------------------- the loss
def shape_iou_mgca(wh: Tensor, anchors: Tensor) -> Tensor:
    """K x A IoU of boxes of sizes ``wh`` (K x 2) and anchors (A x 2) placed at a common corner, in grid
    units, with MGCA's legacy "+1" in every side length (``bbox_iou`` in mgca/utils/yolo_loss.py).

    The +1 was meant for integer pixel boxes; on grid units it inflates small boxes' IoU with small
    anchors a lot. It decides which anchor (and which no-object penalties) a box gets, so it is kept
    for comparability.
    """
    w, h = wh[:, None, 0], wh[:, None, 1]
    aw, ah = anchors[None, :, 0], anchors[None, :, 1]
    inter = (torch.minimum(w, aw) + 1) * (torch.minimum(h, ah) + 1)
    union = (w + 1) * (h + 1) + (aw + 1) * (ah + 1) - inter
    return inter / (union + 1e-16)


def yolo_level_loss(p: Tensor, boxes: Tensor, cls: Tensor, img: Tensor, anchors_px: Tensor, stride: float,
                    num_classes: int) -> dict[str, Tensor]:
    """The unweighted terms of MGCA's ``YOLOLoss`` at one scale.

    ``p``: B x A x H x W x (5+C) raw outputs; ``boxes``: K x 4 xyxy pixels; ``cls``: K 0-based classes;
    ``img``: K image indices; ``anchors_px``: A x 2; ``stride``: pixels per cell.

    Target assignment: each box goes to the cell holding its centre and to the anchor of the best
    shape IoU (``shape_iou_mgca``); a later box of the same image, cell and anchor overwrites an earlier
    one. The no-object term covers every cell and anchor except, at each box's cell, the anchors whose
    shape IoU exceeds ``IGNORE_IOU`` (so an assigned anchor with IoU <= 0.5 gets both terms, as in MGCA).
    Centre and size targets of a shared cell and anchor come from the last box, class targets from all.
    Every term is a mean over all B x A x H x W cells (x C for classes), as MGCA's nn.BCELoss /
    nn.MSELoss on masked tensors are: centre BCE, size MSE on log(w / anchor), objectness
    -log(obj) on assigned cells + 0.5 * -log(1 - obj) on no-object cells, class BCE on assigned cells.
    Written on logits (BCE-with-logits, softplus), which equals MGCA's sigmoid-then-BCE.
    """
    b, a, h, w, _ = p.shape
    n_cells = b * a * h * w
    noobj = torch.ones(b, a, h, w, device=p.device, dtype=p.dtype)
    zero = p.sum() * 0.0
    if len(boxes):
        anchors = anchors_px.to(p.device) / stride
        gx = (boxes[:, 0] + boxes[:, 2]) / 2 / stride
        gy = (boxes[:, 1] + boxes[:, 3]) / 2 / stride
        gw = (boxes[:, 2] - boxes[:, 0]) / stride
        gh = (boxes[:, 3] - boxes[:, 1]) / stride
        gi = gx.floor().long().clamp(0, w - 1)  # a centre on the far edge stays in the last cell
        gj = gy.floor().long().clamp(0, h - 1)
        ious = shape_iou_mgca(torch.stack([gw, gh], 1), anchors)  # K x A
        k_idx, a_idx = torch.nonzero(ious > IGNORE_IOU, as_tuple=True)
        noobj[img[k_idx], a_idx, gj[k_idx], gi[k_idx]] = 0
        best = ious.argmax(1)  # first maximum on ties, like np.argmax
        # one target per (image, anchor, cell): the last box wins, as MGCA's loop overwrites
        key = ((img * a + best) * h + gj) * w + gi
        order = torch.arange(len(key), device=p.device)
        last = torch.full((n_cells,), -1, dtype=torch.long, device=p.device)
        last.scatter_reduce_(0, key, order, reduce="amax")
        sel = last[last >= 0]
        img, best, gi, gj = img[sel], best[sel], gi[sel], gj[sel]
        tx, ty = gx[sel] - gi, gy[sel] - gj
        tw = torch.log(gw[sel] / anchors[best, 0] + 1e-16)
        th = torch.log(gh[sel] / anchors[best, 1] + 1e-16)
        pos = p[img, best, gj, gi]  # P x (5+C)
        # class targets accumulate instead: every box assigned to a cell and anchor sets its class bit
        tcls = torch.zeros(n_cells, num_classes, device=p.device, dtype=p.dtype)
        tcls[key, cls] = 1
        tcls = tcls[key[sel]]
        bce = F.binary_cross_entropy_with_logits
        loss_x = bce(pos[:, 0], tx.to(p.dtype), reduction="sum") / n_cells
        loss_y = bce(pos[:, 1], ty.to(p.dtype), reduction="sum") / n_cells
        loss_w = ((pos[:, 2] - tw) ** 2).sum() / n_cells
        loss_h = ((pos[:, 3] - th) ** 2).sum() / n_cells
        obj_pos = F.softplus(-pos[:, 4]).sum()
        loss_cls = bce(pos[:, 5:], tcls, reduction="sum") / (n_cells * num_classes)
    else:
        loss_x = loss_y = loss_w = loss_h = loss_cls = obj_pos = zero
    obj_neg = (F.softplus(p[..., 4]) * noobj).sum()
    return {"x": loss_x, "y": loss_y, "w": loss_w, "h": loss_h,
            "obj": (obj_pos + NOOBJ_WEIGHT * obj_neg) / n_cells, "cls": loss_cls}
