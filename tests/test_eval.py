"""eval end to end on tiny synthetic sets in the real formats, plus the downstream building blocks."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner

from pipeline import downstream as ds
from pipeline.common import ConfigError, MflagError, file_sha256
from pipeline.datasets.base import Record
from pipeline.synth import downstream as synth
from stages.evaluate import EvalConfig, run

SIZE = 64  # pixels: the real code paths, CPU-sized


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("downstream")
    synth.write_chexpert(root / "chexpert", 40, 0, image_size=SIZE)
    synth.write_covidx(root / "covidx", 36, 0, image_size=SIZE)
    synth.write_siim(root / "siim", 24, 0, image_size=SIZE)
    synth.write_rsna(root / "rsna", 20, 0, image_size=SIZE)
    return root


@pytest.fixture(scope="module")
def encoder_pt(tmp_path_factory):
    """An encoder.pt as train-vision writes it: a torchvision resnet50 state_dict without fc.*."""
    torch.manual_seed(123)
    model = torchvision.models.resnet50(weights=None)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    torch.save(state, path)
    return path


def _cfg(data, tmp_path, **kw):
    base = dict(image_size=SIZE, batch_size=4, epochs=1, seeds=(0,), init="random", out=str(tmp_path / "out"))
    base.update(kw)
    base["root"] = str(data / base["dataset"].replace("-", "_")) if "root" not in kw else kw["root"]
    return EvalConfig(**base)


def _results(out):
    res = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text().strip().splitlines()
    return res, md


# --------------------------------------------------------------------------- end to end
def test_cls_chexpert_linear_probe_two_seeds_and_resume(data, tmp_path, caplog):
    cfg = _cfg(data, tmp_path, task="cls", dataset="chexpert", seeds=(0, 1), fraction=0.5, epochs=3,
               init="random")
    res = run(cfg)
    out = tmp_path / "out"
    saved, md = _results(out)
    assert saved["fingerprint"] == res["fingerprint"]
    assert saved["primary_metric"] == "auroc" and "auroc" in saved["metric_definitions"]
    assert [r["seed"] for r in saved["per_seed"]] == [0, 1]
    for r in saved["per_seed"]:
        assert r["test"]["auroc"] is None or 0.0 <= r["test"]["auroc"] <= 1.0
        assert 0 <= r["best_epoch"] < r["epochs_run"] <= 3
    counts = saved["split"]["counts"]
    assert counts["train"] > 0 and counts["val"] > 0 and counts["test"] > 0
    # fraction 0.5 of the training split, sampled per seed, recorded and written as id lists
    for s in ("0", "1"):
        n = saved["fraction_sizes"][s]
        assert max(1, round(0.5 * counts["train"])) <= n < counts["train"]
        ids = (out / "split" / saved["fraction_files"][s]["file"]).read_text().split()
        assert len(ids) == n
        assert set(ids) <= set((out / "split" / "train.txt").read_text().split())
    assert saved["summary"]["auroc"]["n"] <= 2
    assert saved["checkpoint_sha256"] is None and saved["init"] == "random"
    assert saved["hyperparameters"]["epochs"] == 3 and saved["hyperparameters"]["frozen_encoder"]
    assert json.loads((out / "config.json").read_text())["fingerprint"] == res["fingerprint"]
    assert len(md) == 3 and "| cls | chexpert | random |" in md[2] and res["fingerprint"] in md[2]

    # a rerun of a finished config changes nothing; extending the seeds reuses the finished ones
    mtime = (out / "seeds" / "seed-0.json").stat().st_mtime_ns
    assert run(cfg)["per_seed"] == saved["per_seed"]
    assert len((out / "results.md").read_text().strip().splitlines()) == 3
    more = run(dataclasses.replace(cfg, seeds=(0, 1, 2)))
    assert [r["seed"] for r in more["per_seed"]] == [0, 1, 2]
    assert (out / "seeds" / "seed-0.json").stat().st_mtime_ns == mtime
    assert more["per_seed"][:2] == saved["per_seed"]
    assert len((out / "results.md").read_text().strip().splitlines()) == 4

    # another configuration in the same folder is refused, not mixed
    with pytest.raises(MflagError, match="another configuration"):
        run(dataclasses.replace(cfg, fraction=1.0))


def test_cls_linear_probe_is_deterministic_and_split_file_reuses_the_split(data, tmp_path):
    a = run(_cfg(data, tmp_path / "a", task="cls", dataset="covidx", epochs=2, seeds=(3,)))
    # the second run reads the first run's split folder: same split, same numbers, same fingerprint
    b = run(_cfg(data, tmp_path / "b", task="cls", dataset="covidx", epochs=2, seeds=(3,),
                 split_file=str(tmp_path / "a" / "out" / "split")))
    assert a["split"]["sha256"] == b["split"]["sha256"]
    assert a["per_seed"][0]["test"] == b["per_seed"][0]["test"]
    assert a["fingerprint"] == b["fingerprint"]
    assert a["fraction_sizes"] == b["fraction_sizes"]


def test_cli_cls_covidx_finetune_with_encoder_pt(data, tmp_path, encoder_pt):
    from cli import cli

    out = tmp_path / "cli"
    args = ["eval", "--task", "cls", "--dataset", "covidx", "--root", str(data / "covidx"), "--out", str(out),
            "--init", str(encoder_pt), "--fraction", "0.5", "--seeds", "0", "--finetune", "--epochs", "1",
            "--batch-size", "4", "--image-size", str(SIZE)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "test accuracy" in r.output
    res, md = _results(out)
    assert res["checkpoint_sha256"] == file_sha256(encoder_pt)
    assert res["checkpoint_layout"] == "torchvision"
    assert res["finetune"] is True and res["hyperparameters"]["normalize"] == "half"
    acc = res["per_seed"][0]["test"]["accuracy"]
    assert 0.0 <= acc <= 1.0 and res["summary"]["accuracy"]["mean"] == pytest.approx(acc)
    assert res["class_names"] == ["normal", "pneumonia", "COVID-19"]
    assert res["fraction_sizes"]["0"] < res["split"]["counts"]["train"]
    assert "encoder.pt" in md[2] and res["checkpoint_sha256"][:12] in md[2]

    # bad input is one error line and exit code 2
    bad = CliRunner().invoke(cli, args[:-2] + ["--image-size", "8"])
    assert bad.exit_code == 2 and "--image-size: must be in" in bad.output  # the option as typed
    missing = CliRunner().invoke(cli, ["eval", "--task", "seg", "--dataset", "covidx", "--root",
                                       str(data / "covidx"), "--out", str(tmp_path / "x"), "--init", "random"])
    assert missing.exit_code == 2 and "error:" in missing.output


def test_seg_siim_dice(data, tmp_path, encoder_pt):
    res = run(_cfg(data, tmp_path, task="seg", dataset="siim", init=str(encoder_pt)))
    assert res["primary_metric"] == "dice"
    t = res["per_seed"][0]["test"]
    assert 0.0 <= t["dice"] <= 1.0 and 0.0 <= t["dice_pooled"] <= 1.0
    assert t["n_images"] == res["split"]["counts"]["test"]
    assert "empty" in res["metric_definitions"]["dice"] and "dice_pooled" in res["metric_definitions"]
    assert res["hyperparameters"]["frozen_encoder"] is True


def test_det_rsna_fasterrcnn_map(data, tmp_path):
    res = run(_cfg(data, tmp_path, task="det", dataset="rsna"))
    assert res["primary_metric"] == "map_40_75"
    t = res["per_seed"][0]["test"]
    assert t["n_images"] == res["split"]["counts"]["test"]
    for k in ("map_40_75", "map_coco", "map_50"):
        assert t[k] is None or 0.0 <= t[k] <= 1.0
        assert k in res["metric_definitions"]
    assert "0.40:0.75" in res["metric_definitions"]["map_40_75"]
    assert res["per_seed"][0]["bn_calibration_images"] > 0


def test_det_object_cxr_retinanet(data, tmp_path):
    synth.write_object_cxr(tmp_path / "object_cxr", 20, 1, image_size=SIZE)
    res = run(_cfg(data, tmp_path, task="det", dataset="object-cxr", det_model="retinanet",
                   root=str(tmp_path / "object_cxr"), finetune=True))
    t = res["per_seed"][0]["test"]
    assert res["hyperparameters"]["head"] == "retinanet"
    # The detection body's BN is frozen even when fine-tuned: a random body gets estimated statistics.
    assert res["per_seed"][0]["bn_calibration_images"] > 0
    assert t["n_images"] == res["split"]["counts"]["test"] and t["n_gt_boxes"] >= 0
    assert res["split"]["protocol"]  # the split says how it was made (dev.csv is the test set)


def test_config_validation_names_the_field(tmp_path):
    good = dict(task="cls", dataset="covidx", root=str(tmp_path), out=str(tmp_path / "o"), init="random")
    for field, value in (("task", "clf"), ("fraction", 0.0), ("seeds", ()), ("image_size", 16),
                         ("det_model", "yolo"), ("init", str(tmp_path / "nope.pt")), ("lr", -1.0)):
        with pytest.raises(ConfigError, match=field):
            EvalConfig(**{**good, field: value})
    assert EvalConfig(**{**good, "init": "imagenet"}).norm() == "imagenet"
    assert EvalConfig(**good).effective()["epochs"] == 100
    assert EvalConfig(**{**good, "finetune": True}).effective()["epochs"] == 10


# --------------------------------------------------------------------------- building blocks
def _encoder_state(seed=0):
    torch.manual_seed(seed)
    m = torchvision.models.resnet50(weights=None)
    return {k: v for k, v in m.state_dict().items() if not k.startswith("fc.")}


def test_unet_and_detector_carry_the_encoder_weights_and_freeze_them():
    state = _encoder_state()
    unet = ds.build_unet(state, finetune=False)
    assert torch.equal(unet.encoder.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])
    assert not any(p.requires_grad for p in unet.encoder.parameters())
    assert any(p.requires_grad for p in unet.decoder.parameters())
    assert all(p.requires_grad for p in ds.build_unet(state, finetune=True).encoder.parameters())

    det = ds.build_detector("fasterrcnn", state, 64, finetune=False)
    body = det.backbone.body
    assert torch.equal(body.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert torch.equal(body.bn1.running_mean, state["bn1.running_mean"])
    assert not any(p.requires_grad for p in body.parameters())
    assert any(p.requires_grad for p in det.backbone.fpn.parameters())
    assert det.transform.min_size == (64,)
    retina = ds.build_detector("retinanet", state, 64, finetune=True)
    assert any(p.requires_grad for p in retina.backbone.body.layer1.parameters())

    broken = dict(state)
    broken.pop("layer1.0.conv1.weight")
    with pytest.raises(MflagError, match="layer1.0.conv1.weight"):
        ds.build_detector("fasterrcnn", broken, 64, finetune=False)
    with pytest.raises(MflagError):
        ds.build_unet(broken, finetune=False)


def test_det_dataset_scales_and_clips_boxes(tmp_path):
    from PIL import Image

    p = tmp_path / "a.png"
    Image.fromarray(np.zeros((100, 200), np.uint8)).save(p)
    rec = Record(image_id="a", patient_id="a", path=p,
                 boxes=((20.0, 10.0, 60.0, 50.0), (150.0, 90.0, 260.0, 130.0), (5.0, 5.0, 5.5, 6.0)))
    src = ds.ImageSource([rec], 50)
    img, target = ds.DetDataset(src)[0]
    assert img.shape == (50, 50) and img.dtype == torch.uint8
    # x scales by 50/200, y by 50/100; the second box is clipped, the tiny third one dropped
    assert target["boxes"].tolist() == [[5.0, 5.0, 15.0, 25.0], [37.5, 45.0, 50.0, 50.0]]
    assert target["labels"].tolist() == [1, 1]


def test_augmentation_moves_mask_with_image_and_is_reproducible():
    img = np.zeros((64, 64), np.uint8)
    img[20:40, 24:44] = 200
    mask = (img > 0).astype(np.uint8)
    a1, m1 = ds.augment(img, mask, np.random.default_rng(5))
    a2, m2 = ds.augment(img, mask, np.random.default_rng(5))
    assert np.array_equal(a1, a2) and np.array_equal(m1, m2)
    assert not np.array_equal(m1, mask)  # it did move
    bright = a1 > np.median(a1) + 40
    assert (bright & (m1 > 0)).sum() / max(bright.sum(), 1) > 0.9


def test_linear_probe_learns_separable_features_and_keeps_best_epoch():
    rng = np.random.default_rng(0)
    y = (rng.random((600, 2)) < 0.5).astype(np.float32)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    x[:, :2] += 3 * y  # the Bayes-optimal AUROC is about 0.98
    settings = ds.TrainSettings(epochs=30, batch_size=32, lr=1e-2, patience=5, seed=0)
    predict, fitted = ds.train_linear_probe(x[:400], y[:400], x[400:500], y[400:500], "multilabel", ["a", "b"],
                                            settings)
    from pipeline.metrics import mean_auroc

    assert mean_auroc(y[500:], predict(x[500:])) > 0.93
    best = fitted.history[fitted.best_epoch]["val_auroc"]
    assert best == max(h["val_auroc"] for h in fitted.history)
    assert math.isfinite(fitted.history[0]["val_loss"])


def test_to_input_normalisations():
    x = torch.full((2, 4, 4), 255, dtype=torch.uint8)
    assert ds.to_input(x, "half").shape == (2, 3, 4, 4)
    assert torch.allclose(ds.to_input(x, "half"), torch.ones(2, 3, 4, 4))
    assert ds.to_input(x, "imagenet")[0, 0, 0, 0] == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)


def test_calibrate_bn_normalises_a_random_encoder_without_touching_weights(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    recs = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(p)
        recs.append(Record(image_id=str(i), patient_id=str(i), path=p))
    src = ds.ImageSource(recs, 64)
    torch.manual_seed(0)
    enc = torchvision.models.resnet50(weights=None)
    enc.fc = torch.nn.Identity()
    w = enc.layer3[0].conv1.weight.clone()
    settings = ds.TrainSettings(epochs=1, batch_size=4, lr=1e-3, patience=1, seed=0, norm="half")
    before = ds.extract_features(enc, src, range(6), settings).std()
    assert ds.calibrate_bn(enc, src, list(range(6)), settings) == 6
    after = ds.extract_features(enc, src, range(6), settings).std()
    assert torch.equal(enc.layer3[0].conv1.weight, w)
    assert not enc.training and enc.bn1.momentum == 0.1
    assert after < before / 3, (before, after)
