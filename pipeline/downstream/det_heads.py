"""The detection heads, declared once: ``--det-model`` choices, the recipes (``pipeline.downstream.recipes``)
and the models (``pipeline.downstream.det``) all read ``DET_HEADS``. Without torch, so configs check a head's
name and properties before any model code loads; ``det.py`` builds the model a head names.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DetHeadEntry:
    """``build``: ``"module:function"`` building the model (imported when a model is built), called as
    ``build(encoder_state, image_size, finetune, norm)`` (torchvision's call convention). ``body``: the
    attribute path of the ResNet50 inside the model (kept in eval mode when the recipe fixes its BatchNorm).
    ``frozen_bn``: the body uses torchvision's FrozenBatchNorm2d, fine-tuned or not, so its BatchNorm never
    adapts. ``size_multiple``: image sizes must be a multiple of it (1: any). ``title``: its name in messages;
    ``description``: one line."""

    build: str
    body: str
    frozen_bn: bool
    size_multiple: int
    title: str
    description: str


DET_HEADS: dict[str, DetHeadEntry] = {
    "fasterrcnn": DetHeadEntry("pipeline.downstream.det:build_fasterrcnn", "backbone.body", True, 1, "Faster R-CNN",
                               "torchvision Faster R-CNN, ResNet50-FPN body with frozen BatchNorm"),
    "retinanet": DetHeadEntry("pipeline.downstream.det:build_retinanet", "backbone.body", True, 1, "RetinaNet",
                              "torchvision RetinaNet, ResNet50-FPN (P3-P7) body with frozen BatchNorm"),
    "yolov3": DetHeadEntry("pipeline.downstream.det:build_yolo", "backbone", False, 32, "YOLOv3",
                           "MGCA's YOLOv3 head on C3-C5 of a frozen ResNet50 whose BatchNorm follows the model's "
                           "mode"),
}


def det_head_names() -> tuple[str, ...]:
    """The registered heads' names (the ``--det-model`` choices, read when needed)."""
    return tuple(DET_HEADS)
