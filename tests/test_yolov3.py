"""MGCA's YOLOv3 head (pipeline.downstream.yolov3): loss against a loop-by-loop reference of MGCA's YOLOLoss,
decoding, NMS-then-threshold = threshold-then-NMS, the frozen backbone's BatchNorm modes and input errors.
That the head learns is shown through the eval stage (tests/test_eval_learning.py, MGCA's recipe)."""
import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import batched_nms

from pipeline.common import MflagError
from pipeline.downstream import metrics
from pipeline.downstream.yolov3 import MGCA_ANCHORS_416, SCORE_THRESH, anchors_for, build_yolov3, shape_iou_mgca

S = 64


@pytest.fixture(scope="module")
def random_state():
    torch.manual_seed(0)
    return {k: v for k, v in torchvision.models.resnet50(weights=None).state_dict().items()
            if not k.startswith("fc.")}


def _target(boxes, labels=None):
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    lab = torch.ones(len(b), dtype=torch.int64) if labels is None else torch.tensor(labels, dtype=torch.int64)
    return {"boxes": b, "labels": lab}


# --------------------------------------------------------------------------- loss
def _legacy_iou(w1, h1, w2, h2):
    # corner-aligned boxes with the "+1" side lengths of MGCA's bbox_iou
    inter = (min(w1, w2) + 1) * (min(h1, h2) + 1)
    return inter / ((w1 + 1) * (h1 + 1) + (w2 + 1) * (h2 + 1) - inter + 1e-16)


def _reference_loss(raw_levels, targets, image_size, num_classes):
    """MGCA's YOLOLoss written out cell by cell: masks filled in a Python loop over boxes, then
    nn.BCELoss / nn.MSELoss (mean reduction) on sigmoid outputs multiplied by the masks."""
    anchors = anchors_for(image_size).tolist()
    parts = {"xy": 0.0, "wh": 0.0, "obj": 0.0, "cls": 0.0}
    bce, mse = nn.BCELoss(), nn.MSELoss()
    for level, raw in enumerate(raw_levels):
        b, _, h, w = raw.shape
        stride = image_size / w
        pred = raw.view(b, 3, 5 + num_classes, h, w).permute(0, 1, 3, 4, 2)
        x, y = pred[..., 0].sigmoid(), pred[..., 1].sigmoid()
        pw, ph = pred[..., 2], pred[..., 3]
        conf, cls = pred[..., 4].sigmoid(), pred[..., 5:].sigmoid()
        mask, noobj = torch.zeros(b, 3, h, w), torch.ones(b, 3, h, w)
        tx, ty, tw, th = (torch.zeros(b, 3, h, w) for _ in range(4))
        tcls = torch.zeros(b, 3, h, w, num_classes)
        level_anchors = [(aw / stride, ah / stride) for aw, ah in anchors[level]]
        for i, t in enumerate(targets):
            for (x1, y1, x2, y2), lab in zip(t["boxes"].tolist(), t["labels"].tolist()):
                gx, gy = (x1 + x2) / 2 / stride, (y1 + y2) / 2 / stride
                gw, gh = (x2 - x1) / stride, (y2 - y1) / stride
                gi, gj = int(gx), int(gy)
                ious = [_legacy_iou(gw, gh, aw, ah) for aw, ah in level_anchors]
                for n, iou in enumerate(ious):
                    if iou > 0.5:
                        noobj[i, n, gj, gi] = 0
                n = int(np.argmax(ious))
                mask[i, n, gj, gi] = 1
                tx[i, n, gj, gi], ty[i, n, gj, gi] = gx - gi, gy - gj
                tw[i, n, gj, gi] = math.log(gw / level_anchors[n][0] + 1e-16)
                th[i, n, gj, gi] = math.log(gh / level_anchors[n][1] + 1e-16)
                tcls[i, n, gj, gi, lab - 1] = 1
        m = mask.unsqueeze(-1)
        parts["xy"] = parts["xy"] + 2.5 * (bce(x * mask, tx * mask) + bce(y * mask, ty * mask))
        parts["wh"] = parts["wh"] + 2.5 * (mse(pw * mask, tw * mask) + mse(ph * mask, th * mask))
        parts["obj"] = parts["obj"] + bce(conf * mask, mask) + 0.5 * bce(conf * noobj, noobj * 0.0)
        parts["cls"] = parts["cls"] + bce(cls * m, tcls * m)
    return parts


# Boxes 0 and 1 share a cell and an anchor at every scale (centre and size targets of the later box win,
# both classes are targets); at stride 8 no anchor has shape IoU > 0.5 with any box, so the assigned
# anchor also keeps its no-object penalty; image 1 has no box; image 2's box fills the image.
LOSS_TARGETS = [
    _target([[8, 8, 28, 24], [10, 9, 26, 25], [40, 30, 62, 38], [20, 4, 28, 60]], [1, 2, 1, 2]),
    _target([]),
    _target([[0, 0, 64, 64]], [2]),
]


def test_loss_equals_reference_mgca_loss_and_its_gradient(random_state):
    model = build_yolov3(random_state, S, num_classes=2)
    torch.manual_seed(1)
    n_out = 3 * (5 + 2)
    raw = [(torch.randn(3, n_out, S // s, S // s) * 1.5).requires_grad_() for s in (32, 16, 8)]
    ours = model.loss(raw, LOSS_TARGETS)
    ref = _reference_loss(raw, LOSS_TARGETS, S, 2)
    for ours_key, ref_key in (("loss_xy", "xy"), ("loss_wh", "wh"), ("loss_obj", "obj"), ("loss_cls", "cls")):
        assert ours[ours_key].item() == pytest.approx(ref[ref_key].item(), rel=1e-5), ours_key
    g_ours = torch.autograd.grad(sum(ours.values()), raw)
    g_ref = torch.autograd.grad(sum(ref.values()), raw)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # the scenarios named above really occur
    for st in (32, 16, 8):
        wh = torch.tensor([[20.0, 16], [16, 16], [22, 8], [8, 56], [64, 64]]) / st
        iou = shape_iou_mgca(wh, anchors_for(S)[(32, 16, 8).index(st)] / st)
        assert iou[0].argmax() == iou[1].argmax()
        if st == 8:
            assert (iou <= 0.5).all()


def test_anchors_are_mgcas_scaled_to_the_input():
    a = anchors_for(224)
    # MGCA at 224 px: tensor(anchors) * 224 / 416; the coarsest scale first
    assert a[0, 0].tolist() == pytest.approx([116 * 224 / 416, 90 * 224 / 416])
    assert a[2, 0].tolist() == pytest.approx([10 * 224 / 416, 13 * 224 / 416])
    assert anchors_for(416).tolist() == [[list(map(float, wh)) for wh in row] for row in MGCA_ANCHORS_416]


# --------------------------------------------------------------------------- inference
def test_decode_places_a_box_from_cell_offset_and_anchor(random_state):
    model = build_yolov3(random_state, S).eval()
    raw = [torch.full((1, 3 * 6, S // s, S // s), -10.0) for s in (32, 16, 8)]
    # stride 8, anchor 1, cell (row 3, column 5): offsets sigmoid(0) = 0.5, width 2 x anchor
    p = raw[2].view(1, 3, 6, 8, 8)
    p[0, 1, :, 3, 5] = torch.tensor([0.0, 0.0, math.log(2.0), 0.0, 3.0, 2.0])
    out = model.detect(raw)
    aw, ah = anchors_for(S)[2, 1].tolist()
    cx, cy = (0.5 + 5) * 8, (0.5 + 3) * 8
    assert len(out) == 1 and len(out[0]["boxes"]) == 1  # sigmoid(-10) < SCORE_THRESH everywhere else
    assert out[0]["boxes"][0].tolist() == pytest.approx([cx - aw, cy - ah / 2, cx + aw, cy + ah / 2], abs=1e-4)
    assert float(out[0]["scores"][0]) == pytest.approx(1 / (1 + math.exp(-3.0)), abs=1e-6)
    assert out[0]["labels"].tolist() == [1] and out[0]["labels"].dtype == torch.int64


def test_nms_then_threshold_equals_mgcas_threshold_then_nms(random_state):
    model = build_yolov3(random_state, S, num_classes=2).eval()
    torch.manual_seed(3)
    raw = []
    for s in (32, 16, 8):
        r = torch.randn(4, 3, 7, S // s, S // s) * 0.5
        r[:, :, 2:4] += 3.0  # boxes ~20 x their anchors overlap their neighbours
        r[:, :, 4] = torch.randn(4, 3, S // s, S // s) * 2.0 - 2.0  # about 16% of them score >= 0.5
        raw.append(r.reshape(4, 21, S // s, S // s))
    ours = model.detect(raw)
    boxes, obj, cls_prob = model.decode(raw)
    compared = suppressed = 0
    for i, det in enumerate(ours):
        cut = det["scores"] >= 0.5
        # boxes under 0.5 follow the confident ones, so the 100-box cap did not cut into those
        assert 0 < int(cut.sum()) < len(det["scores"]) <= 100
        assert bool((det["scores"] >= SCORE_THRESH).all())
        assert bool((det["scores"][:-1] >= det["scores"][1:]).all())
        # MGCA: threshold at 0.5, then NMS per class
        keep = obj[i] >= 0.5
        b, s, lab = boxes[i][keep], obj[i][keep], cls_prob[i][keep].argmax(-1) + 1
        k = batched_nms(b, s, lab, 0.5)
        mgca = sorted(zip(s[k].tolist(), lab[k].tolist()))
        mine = sorted(zip(det["scores"][cut].tolist(), det["labels"][cut].tolist()))
        assert mine == mgca
        # the metric's filter gives the same boxes again
        kept, _ = metrics.mgca_eligible([det], [_target([[0, 0, 10, 10]])])
        assert sorted(kept[0]["scores"].tolist()) == sorted(s[k].tolist())
        compared += len(mgca)
        suppressed += len(s) - len(k)
    # NMS removed confident boxes, so the equality is not trivial
    assert compared > 20 and suppressed > 20


# --------------------------------------------------------------------------- frozen backbone, modes
def test_backbone_is_frozen_but_its_batchnorm_follows_the_mode(random_state):
    model = build_yolov3(random_state, S)
    backbone_params = list(model.backbone.parameters())
    assert backbone_params and not any(p.requires_grad for p in backbone_params)
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    assert head and all(p.requires_grad for p in head)
    bn = model.backbone["layer1"][0].bn1
    weights = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    images = [torch.rand(3, S, S) for _ in range(2)]
    targets = [_target([[10, 10, 30, 30]]), _target([])]
    model.train()
    assert bn.training
    losses = model(images, targets)
    assert set(losses) == {"loss_xy", "loss_wh", "loss_obj", "loss_cls"}
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()
    after = model.backbone.state_dict()
    for k, v in weights.items():
        if "running_" in k or "num_batches" in k:
            continue
        assert torch.equal(after[k], v), k  # weights untouched
    assert not torch.equal(after["layer1.0.bn1.running_mean"], weights["layer1.0.bn1.running_mean"])
    model.eval()
    assert not bn.training
    stats = bn.running_mean.clone()
    preds = model(images)
    assert torch.equal(bn.running_mean, stats)  # eval mode leaves the statistics alone
    assert len(preds) == 2 and all(set(p) == {"boxes", "scores", "labels"} for p in preds)
    assert all(len(p["boxes"]) <= 100 for p in preds)


def test_input_errors_name_the_problem(random_state):
    with pytest.raises(MflagError, match="multiple of 32"):
        build_yolov3(random_state, 100)
    with pytest.raises(MflagError, match="normalisation"):
        build_yolov3(random_state, S, norm="cifar")
    broken = dict(random_state)
    broken.pop("layer4.2.conv3.weight")
    with pytest.raises(MflagError, match="layer4.2.conv3.weight"):
        build_yolov3(broken, S)
    model = build_yolov3(random_state, S)
    with pytest.raises(MflagError, match="3 x 64 x 64"):
        model([torch.rand(3, 32, 32)], [_target([])])
    with pytest.raises(MflagError, match="needs targets"):
        model.train()([torch.rand(3, S, S)])
    with pytest.raises(MflagError, match="target 1 has labels"):
        model.train()([torch.rand(3, S, S)] * 2, [_target([]), _target([[1, 1, 9, 9]], [0])])
    with pytest.raises(MflagError, match="target 0 has a degenerate"):
        model.train()([torch.rand(3, S, S)], [_target([[5, 5, 5, 9]])])
