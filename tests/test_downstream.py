"""Building blocks of pipeline.downstream: images and transforms, the loop, the losses, the heads, the recipes."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from pipeline.common import MflagError
from pipeline.downstream import cls, data, det, get_task, loop, recipes, seg
from pipeline.downstream.datasets.base import DatasetSpec, Record


def _encoder_state(seed=0):
    torch.manual_seed(seed)
    m = torchvision.models.resnet50(weights=None)
    return {k: v for k, v in m.state_dict().items() if not k.startswith("fc.")}


def _png(path, arr):
    from PIL import Image

    Image.fromarray(arr).save(path)
    return path


# --------------------------------------------------------------------------- registry and heads
def test_registry_names_every_task_and_head():
    assert [get_task(n).name for n in ("cls", "seg", "det")] == ["cls", "seg", "det"]
    # the heads are declared once (det_heads.DET_HEADS): --det-model, the recipes' defaults and the builders follow
    from pipeline.downstream.det_heads import DET_HEADS
    from pipeline.options import option_choices
    from stages.evaluate import EvalConfig

    assert option_choices(EvalConfig, "det_model") == tuple(DET_HEADS)
    assert all(callable(det.head_builder(k)) for k in DET_HEADS)
    assert {recipes.resolve(p, "det", "rsna", 1.0, False, "random").head for p in recipes.PROTOCOLS} <= set(DET_HEADS)
    with pytest.raises(KeyError, match="unknown task"):
        get_task("caption")


@pytest.mark.slow
def test_unet_and_detector_carry_the_encoder_weights_and_freeze_them():
    state = _encoder_state()
    unet = seg.build_unet(state, finetune=False)
    assert torch.equal(unet.encoder.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])
    assert not any(p.requires_grad for p in unet.encoder.parameters())
    assert any(p.requires_grad for p in unet.decoder.parameters())
    assert all(p.requires_grad for p in seg.build_unet(state, finetune=True).encoder.parameters())

    frcnn = det.build_detector("fasterrcnn", state, 64, finetune=False)
    body = frcnn.backbone.body
    assert torch.equal(body.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert torch.equal(body.bn1.running_mean, state["bn1.running_mean"])
    assert not any(p.requires_grad for p in body.parameters())
    assert any(p.requires_grad for p in frcnn.backbone.fpn.parameters())
    assert frcnn.transform.min_size == (64,)
    retina = det.build_detector("retinanet", state, 64, finetune=True)
    assert all(p.requires_grad for p in retina.backbone.body.parameters())

    broken = dict(state)
    broken.pop("layer1.0.conv1.weight")
    with pytest.raises(MflagError, match="layer1.0.conv1.weight"):
        det.build_detector("fasterrcnn", broken, 64, finetune=False)
    with pytest.raises(MflagError):
        seg.build_unet(broken, finetune=False)


@pytest.mark.slow
@pytest.mark.parametrize("trainable,returned,extra", [(0, [1, 2, 3, 4], None), (3, [2, 3, 4], "p6p7"),
                                                      (5, [1, 2, 3, 4], None)])
def test_public_fpn_backbone_equals_torchvision_private_extractor(trainable, returned, extra):
    """Our BackboneWithFPN build is what torchvision's own (private) extractor makes: same modules,
    same weights, same frozen parameters, same outputs."""
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    state = _encoder_state(1)
    # the same random draws on both sides: extra blocks, then the body, then the FPN layers
    torch.manual_seed(0)
    blocks = LastLevelP6P7(256, 256) if extra else None
    torch.manual_seed(1)
    ours = det.resnet_fpn(state, trainable, returned, blocks)
    torch.manual_seed(0)
    blocks = LastLevelP6P7(256, 256) if extra else None
    torch.manual_seed(1)
    ref_body = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    ref_body.load_state_dict(state, strict=False)
    ref = _resnet_fpn_extractor(ref_body, trainable, returned_layers=returned, extra_blocks=blocks)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert a.requires_grad == b.requires_grad, n
        assert torch.equal(a, b), n
    x = torch.randn(1, 3, 64, 64)
    ours.eval(), ref.eval()
    for (ka, a), (kb, b) in zip(ours(x).items(), ref(x).items()):
        assert ka == kb and torch.allclose(a, b)


# --------------------------------------------------------------------------- images
def test_pad_resize_follows_mgca_resize_img_and_boxes_follow_it(tmp_path):
    # MGCA's resize_img: a 100 x 200 image to 50 -> 25 x 50, zero-padded 12 rows above and 13 below
    assert data.pad_geometry(100, 200, 50) == (25, 50, 12, 0)
    assert data.pad_geometry(200, 100, 50) == (50, 25, 0, 12)
    assert data.pad_geometry(7, 7, 5) == (5, 5, 0, 0)
    img = np.zeros((100, 200), np.uint8)
    img[10:50, 20:60] = 255  # the box (20, 10, 60, 50)
    rec = Record(image_id="a", patient_id="a", path=_png(tmp_path / "a.png", img), boxes=((20.0, 10.0, 60.0, 50.0),))
    src = data.ImageSource([rec], 50, resize="pad", resample="area")
    stored, _ = src.get(0)
    assert stored[:12].max() == 0 and stored[37:].max() == 0  # the padding
    assert stored[12:37].max() == 255
    _, target = data.DetDataset(src)[0]
    assert target["boxes"].tolist() == [[5.0, 14.5, 15.0, 24.5]]  # x * 0.25, y * 0.25 + 12
    x1, y1, x2, y2 = (int(v) for v in target["boxes"][0])
    assert stored[y1 + 1:y2 - 1, x1 + 1:x2 - 1].min() > 200 and stored[:, x2 + 1:].max() < 50


def test_det_dataset_scales_and_clips_boxes(tmp_path):
    rec = Record(image_id="a", patient_id="a", path=_png(tmp_path / "a.png", np.zeros((100, 200), np.uint8)),
                 boxes=((20.0, 10.0, 60.0, 50.0), (150.0, 90.0, 260.0, 130.0), (5.0, 5.0, 5.5, 6.0)))
    img, target = data.DetDataset(data.ImageSource([rec], 50))[0]
    assert img.shape == (50, 50) and img.dtype == torch.uint8
    # x scales by 50/200, y by 50/100; the second box is clipped, the tiny third one dropped
    assert target["boxes"].tolist() == [[5.0, 5.0, 15.0, 25.0], [37.5, 45.0, 50.0, 50.0]]
    assert target["labels"].tolist() == [1, 1]


def test_linear_resample_samples_like_cv2_inter_linear():
    # stripes of period 2; a 3x shrink with half-pixel centres samples source pixels 1, 4, 7, ... exactly
    # (cv2.INTER_LINEAR, MGCA's seg/det resize); the antialiased resize averages them to mid-grey
    stripes = np.tile(np.array([0, 255], np.uint8), 24)[None].repeat(48, 0)
    lin = data.resize_u8(stripes, 16, "linear")
    assert np.array_equal(lin[0], stripes[0, 1::3])
    assert np.abs(data.resize_u8(stripes, 16, "antialias").astype(int) - 127).max() < 60


def test_masks_are_stored_as_covered_share(tmp_path):
    def mask_fn(rec, h, w):
        m = np.zeros((h, w), np.uint8)
        m[:2, :1] = 1   # top-left 2 x 2 block: half covered
        m[2:, 2:] = 1   # bottom-right block: fully covered
        m[2:, :2] = 1
        m[3, 1] = 0     # bottom-left block: three quarters
        return m

    rec = Record(image_id="a", patient_id="a", path=_png(tmp_path / "a.png", np.zeros((4, 4), np.uint8)))
    _, mask = data.ImageSource([rec], 2, mask_fn=mask_fn, min_side=1).get(0)  # a 4 x 4 px unit case
    # area averages of 0/255: 127.5, 0, 191.25, 255 (PIL rounds in fixed point)
    assert np.abs(mask.astype(int) - [[127.5, 0], [191.25, 255]]).max() <= 1
    assert ((mask > data.MASK_ON).tolist()) == [[True, False], [True, True]]
    soft = seg.mask_target(torch.from_numpy(mask), soft=True)
    assert soft[1, 0] == pytest.approx(0.75, abs=0.005)


def test_to_input_normalisations():
    x = torch.full((2, 4, 4), 255, dtype=torch.uint8)
    assert data.to_input(x, "half").shape == (2, 3, 4, 4)
    assert torch.allclose(data.to_input(x, "half"), torch.ones(2, 3, 4, 4))
    assert data.to_input(x, "imagenet")[0, 0, 0, 0] == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)


# --------------------------------------------------------------------------- transforms
def _square(size=64):
    img = np.zeros((size, size), np.uint8)
    img[20:40, 24:44] = 200
    return img, (img > 0).astype(np.uint8) * 255


def test_mild_augment_moves_mask_with_image_and_is_reproducible():
    img, mask = _square()
    aug = data.make_transform("mild", 64)
    a1, m1 = aug(img, mask, np.random.default_rng(5))
    a2, m2 = aug(img, mask, np.random.default_rng(5))
    assert np.array_equal(a1, a2) and np.array_equal(m1, m2)
    assert not np.array_equal(m1, mask)  # it did move
    bright = a1 > np.median(a1) + 40
    assert (bright & (m1 > 0)).sum() / max(bright.sum(), 1) > 0.9


def test_shift_scale_rotate_moves_the_mask_with_the_image_half_the_time():
    img, mask = _square()
    ssr = data.make_transform("shift-scale-rotate", 64)
    moved = 0
    for k in range(200):
        a, m = ssr(img, mask, np.random.default_rng(k))
        if not np.array_equal(m, mask):
            moved += 1
            bright = a > 100
            assert (bright & (m > 0)).sum() / max(bright.sum(), 1) > 0.9
            area = (m > 0).sum() / (mask > 0).sum()
            assert 0.75 < area < 1.3  # scale 0.9-1.1 in each direction, no shift
    assert 70 <= moved <= 130  # p = 0.5
    a, m = ssr(img, mask, np.random.default_rng(3))
    assert np.array_equal(a, ssr(img, mask, np.random.default_rng(3))[0])


def test_crops_and_moco2():
    img = np.arange(256 * 256, dtype=np.uint32).reshape(256, 256).astype(np.uint8)
    center, _ = data.make_transform("center-crop", 224)(img, None, np.random.default_rng(0))
    assert np.array_equal(center, img[16:240, 16:240])  # torchvision CenterCrop: round((256 - 224) / 2)
    offsets = {data.Crop(224, random=True)(img, None, np.random.default_rng(k))[0][0, 0] for k in range(50)}
    assert len(offsets) > 10
    smooth = np.tile(np.linspace(30, 220, 256).astype(np.uint8), (256, 1))
    moco = data.make_transform("moco2", 224)
    outs = [moco(smooth, None, np.random.default_rng(k))[0] for k in range(200)]
    assert all(o.shape == (224, 224) and o.dtype == np.uint8 for o in outs)
    flipped = sum(int(o[:, 0].mean() > o[:, -1].mean()) for o in outs)  # the ramp runs the other way
    assert 70 <= flipped <= 130
    assert np.array_equal(outs[7], moco(smooth, None, np.random.default_rng(7))[0])


# --------------------------------------------------------------------------- losses
def test_mgca_focal_is_torchvision_focal_without_alpha_on_binary_targets():
    from torchvision.ops import sigmoid_focal_loss

    torch.manual_seed(0)
    x = torch.randn(4, 16, 16) * 3
    t = (torch.rand(4, 16, 16) > 0.7).float()
    assert seg.mgca_focal(x, t) == pytest.approx(float(sigmoid_focal_loss(x, t, alpha=-1, gamma=2,
                                                                            reduction="mean")), rel=1e-5)


def test_mgca_mixed_loss_by_hand():
    # logits 0: p = 0.5 everywhere; one of four pixels positive. Focal: BCE ln 2 times 0.5^2 per pixel;
    # Dice = (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5. Loss = 10 * 0.25 ln 2 - ln 0.5 = 3.5 ln 2.
    t = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert seg.mgca_mixed_loss(torch.zeros(1, 2, 2), t) == pytest.approx(3.5 * math.log(2), rel=1e-6)


# --------------------------------------------------------------------------- the loop
def test_fit_minimises_the_monitor_stops_after_patience_and_restores_the_best_weights():
    model = torch.nn.Linear(2, 1)
    losses = iter([3.0, 2.0, 2.5, 1.5, 1.5, 1.7, 1.8, 0.1])
    snapshots = []
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    loader = loop.make_loader(torch.utils.data.TensorDataset(x, y), loop.TrainSettings(
        epochs=1, batch_size=4, lr=1e-2, patience=1, seed=0), shuffle=True)

    def validate():
        snapshots.append(model.weight.detach().clone())
        return {"loss": next(losses)}

    settings = loop.TrainSettings(epochs=20, batch_size=4, lr=1e-2, patience=3, seed=0, monitor="loss", mode="min")
    fitted = loop.fit(model, loader, lambda b: (((model(b[0]) - b[1]) ** 2).mean(), len(b[0])), validate,
                      settings, "t")
    # 1.5 at epoch 3 is not beaten by the equal 1.5 at epoch 4 (strict improvement), then 3 bad epochs
    assert fitted.best_epoch == 3 and len(fitted.history) == 7
    assert torch.equal(model.weight, snapshots[3]) and not torch.equal(model.weight, snapshots[6])
    assert fitted.selection == "val loss (min)"


def test_linear_probe_learns_separable_features_and_keeps_best_epoch():
    rng = np.random.default_rng(0)
    y = (rng.random((600, 2)) < 0.5).astype(np.float32)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    x[:, :2] += 3 * y  # the Bayes-optimal AUROC is about 0.98
    spec = DatasetSpec(name="toy", root=Path("."), records=[], class_names=("a", "b"))
    settings = loop.TrainSettings(epochs=30, batch_size=32, lr=1e-2, patience=5, seed=0, monitor="auroc", mode="max")
    predict, fitted = cls.train_linear_probe(x[:400], y[:400], x[400:500], y[400:500], spec, settings)
    from pipeline.downstream.metrics import mean_auroc

    assert mean_auroc(y[500:], predict(x[500:]).numpy()) > 0.93
    best = fitted.history[fitted.best_epoch]["val_auroc"]
    assert best == max(h["val_auroc"] for h in fitted.history)
    assert math.isfinite(fitted.history[0]["val_loss"])


def test_calibrate_bn_normalises_a_random_encoder_without_touching_weights(tmp_path):
    rng = np.random.default_rng(0)
    recs = [Record(image_id=str(i), patient_id=str(i),
                   path=_png(tmp_path / f"{i}.png", (rng.random((64, 64)) * 255).astype(np.uint8))) for i in range(6)]
    src = data.ImageSource(recs, 64)
    torch.manual_seed(0)
    enc = torchvision.models.resnet50(weights=None)
    enc.fc = torch.nn.Identity()
    w = enc.layer3[0].conv1.weight.clone()
    settings = loop.TrainSettings(epochs=1, batch_size=4, lr=1e-3, patience=1, seed=0, norm="half")
    before = cls.extract_features(enc, src, range(6), settings).std()
    assert loop.calibrate_bn(enc, src, list(range(6)), settings) == 6
    after = cls.extract_features(enc, src, range(6), settings).std()
    assert torch.equal(enc.layer3[0].conv1.weight, w)
    assert not enc.training and enc.bn1.momentum == 0.1
    assert after < before / 3, (before, after)


# --------------------------------------------------------------------------- predictions files
def test_cls_predictions_round_trip(tmp_path):
    y = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    p = np.array([[0.123456789, 1e-8], [0.5, 0.999999], [0.25, 0.75]], np.float32)
    cls.write_cls_predictions(tmp_path / "p.csv", ["a", "b", "c"], ["x,1", "y"], y, p)
    ids, names, y2, p2 = cls.read_cls_predictions(tmp_path / "p.csv")
    assert ids == ["a", "b", "c"] and names == ["x,1", "y"]
    assert np.array_equal(y2, y) and np.array_equal(p2.astype(np.float32), p)  # float32 round-trips exactly


def test_rle_round_trip():
    m = np.zeros((7, 5), bool)
    m[1:4, 2:5] = True
    m[6, 0] = True
    rle = seg.rle_encode(m)
    assert rle["size"] == [7, 5] and isinstance(rle["counts"], str)
    assert np.array_equal(seg.rle_decode(rle), m)


# --------------------------------------------------------------------------- recipes
def test_mgca_recipe_follows_mgca_code():
    r = recipes.resolve("mgca", "cls", "chexpert", 0.01, False, "random")
    assert (r.batch_size, r.lr, r.weight_decay, r.epochs, r.patience) == (48, 5e-4, 1e-6, 50, 10)
    assert (r.monitor, r.mode, r.features, r.train_transform, r.eval_transform) == (
        "loss", "min", "per-epoch", "moco2", "center-crop")
    assert (r.load_size, r.image_size, r.resize, r.resample, r.normalize) == (256, 224, "pad", "area", "half")
    assert recipes.resolve("mgca", "cls", "covidx", 1.0, False, "random", "multiclass").train_transform == "crop"
    assert recipes.resolve("mgca", "cls", "covidx", 1.0, False, "random", "multiclass").primary == "accuracy"
    s = recipes.resolve("mgca", "seg", "siim", 0.1, False, "imagenet")
    assert (s.batch_size, s.lr, s.weight_decay, s.encoder_bn, s.soft_masks, s.normalize) == (
        8, 5e-4, 0.05, "train", True, "half")
    assert recipes.resolve("mgca", "seg", "rsna", 0.1, False, "random").batch_size == 16
    d = recipes.resolve("mgca", "det", "rsna", 0.01, False, "random")
    assert (d.batch_size, d.lr, d.head, d.monitor, d.primary, d.grad_clip) == (
        8, 2e-4, "yolov3", "map_40_75_mgca", "map_40_75_mgca", None)
    assert recipes.resolve("mgca", "det", "object-cxr", 0.01, False, "random").lr == 2.5e-4
    assert (recipes.resolve("mgca", "det", "rsna", 0.1, False, "random").batch_size,
            recipes.resolve("mgca", "det", "rsna", 0.1, False, "random").lr) == (16, 5e-4)
    # explicit values win
    o = recipes.resolve("mgca", "det", "rsna", 0.01, False, "random", batch_size=4, lr=1e-3, det_model="fasterrcnn")
    assert (o.batch_size, o.lr, o.head, o.encoder_bn) == (4, 1e-3, "fasterrcnn", "fixed")


def test_tool_recipe_is_the_previous_behaviour():
    r = recipes.resolve("tool", "cls", "chexpert", 0.1, False, "imagenet")
    assert (r.epochs, r.patience, r.lr, r.batch_size, r.weight_decay, r.features, r.normalize) == (
        100, 10, 1e-3, 16, 1e-4, "cached", "imagenet")
    assert (r.monitor, r.mode, r.load_size, r.resize) == ("auroc", "max", 224, "stretch")
    d = recipes.resolve("tool", "det", "rsna", 0.1, False, "random")
    assert (d.head, d.grad_clip, d.train_transform, d.primary) == ("fasterrcnn", 10.0, "photometric", "map_40_75")
    s = recipes.resolve("tool", "seg", "siim", 0.1, True, "random")
    assert (s.lr, s.encoder_bn, s.loss) == (1e-4, "train", "bce + per-image soft dice")
