"""eval end to end on tiny synthetic sets in the real formats: outputs, resume, protocols, and metrics that
recompute exactly from the predictions files with sklearn / pycocotools. (What each head must learn is in
tests/test_eval_learning.py; the building blocks are in tests/test_downstream.py.)"""
import dataclasses
import json

import pytest
import torch
import torchvision
from click.testing import CliRunner

from pipeline.common import ConfigError, MflagError, file_sha256
from pipeline.synth import downstream as synth
from stages.evaluate import EvalConfig, run
from tests._recompute import recompute_cls, recompute_det, recompute_seg
from tests._scratch import scratch

SIZE = 64  # pixels: the real code paths, CPU-sized


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("downstream")
    synth.write_chexpert(root / "chexpert", 40, 0, image_size=SIZE)
    synth.write_covidx(root / "covidx", 36, 0, image_size=SIZE)
    synth.write_siim(root / "siim", 24, 0, image_size=SIZE)
    synth.write_rsna(root / "rsna", 20, 0, image_size=SIZE)
    synth.write_object_cxr(root / "object_cxr", 20, 1, image_size=SIZE)
    return root


@pytest.fixture(scope="module")
def encoder_pt(tmp_path_factory):
    """An encoder.pt as train-vision writes it: a torchvision resnet50 state_dict without fc.*."""
    torch.manual_seed(123)
    model = torchvision.models.resnet50(weights=None)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    with scratch(tmp_path_factory, "enc") as folder:
        torch.save(state, folder / "encoder.pt")
        yield folder / "encoder.pt"


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
@pytest.mark.slow
def test_cls_chexpert_linear_probe_two_seeds_and_resume(data, tmp_path, caplog):
    cfg = _cfg(data, tmp_path, task="cls", dataset="chexpert", seeds=(0, 1), fraction=0.5, epochs=3)
    res = run(cfg)
    out = tmp_path / "out"
    saved, md = _results(out)
    assert saved["fingerprint"] == res["fingerprint"] and saved["protocol"] == "tool"
    assert saved["primary_metric"] == "auroc" and "auroc" in saved["metric_definitions"]
    assert [r["seed"] for r in saved["per_seed"]] == [0, 1]
    for r in saved["per_seed"]:
        # the test AUROC is exactly what sklearn gives on the predictions file
        pred = out / "seeds" / r["predictions"]
        assert saved["predictions"][str(r["seed"])] == f"seeds/{r['predictions']}"
        assert r["test"]["auroc"] == pytest.approx(recompute_cls(pred, "multilabel")["auroc"], abs=1e-9)
        ids = [line.split(",")[0] for line in pred.read_text().splitlines()[1:]]
        assert ids == (out / "split" / "test.txt").read_text().split()
        history = [h["val_auroc"] for h in json.loads((out / "seeds" / f"seed-{r['seed']}.json").read_text())
                   ["history"]]
        assert r["epochs_run"] == len(history) == 3  # patience 10 never stops 3 epochs
        assert history[r["best_epoch"]] == max(history)  # tool: the best validation AUROC
    counts = saved["split"]["counts"]
    # fraction 0.5 of the training split, sampled per seed, recorded and written as id lists
    for s in ("0", "1"):
        n = saved["fraction_sizes"][s]
        assert max(1, round(0.5 * counts["train"])) <= n < counts["train"]
        ids = (out / "split" / saved["fraction_files"][s]["file"]).read_text().split()
        assert len(ids) == n
        assert set(ids) <= set((out / "split" / "train.txt").read_text().split())
    assert saved["checkpoint_sha256"] is None and saved["init"] == "random"
    hp = saved["hyperparameters"]
    assert (hp["epochs"], hp["batch_size"], hp["lr"], hp["features"]) == (3, 4, 1e-3, "cached")
    assert json.loads((out / "config.json").read_text())["fingerprint"] == res["fingerprint"]
    assert len(md) == 3 and "| cls | chexpert | tool | random |" in md[2] and res["fingerprint"] in md[2]

    # a rerun of a finished config changes nothing; extending the seeds reuses the finished ones
    mtime = (out / "seeds" / "seed-0.json").stat().st_mtime_ns
    assert run(cfg)["per_seed"] == saved["per_seed"]
    assert len((out / "results.md").read_text().strip().splitlines()) == 3
    more = run(dataclasses.replace(cfg, seeds=(0, 1, 2)))
    assert [r["seed"] for r in more["per_seed"]] == [0, 1, 2]
    assert (out / "seeds" / "seed-0.json").stat().st_mtime_ns == mtime
    assert more["per_seed"][:2] == saved["per_seed"]
    assert len((out / "results.md").read_text().strip().splitlines()) == 4

    # a seed whose predictions file was lost is redone, the others are reused
    (out / "seeds" / "seed-1.predictions.csv").unlink()
    again = run(dataclasses.replace(cfg, seeds=(0, 1, 2, 3)))
    assert (out / "seeds" / "seed-1.predictions.csv").is_file()
    assert again["per_seed"][1]["test"] == saved["per_seed"][1]["test"]  # same seed, same numbers

    # another configuration in the same folder is refused, not mixed; an explicit value equal to the
    # protocol's default is the same configuration
    with pytest.raises(MflagError, match="another configuration"):
        run(dataclasses.replace(cfg, fraction=1.0))
    with pytest.raises(MflagError, match="another configuration"):
        run(dataclasses.replace(cfg, protocol="mgca"))
    assert run(dataclasses.replace(cfg, lr=1e-3, seeds=(0, 1, 2, 3)))["fingerprint"] == again["fingerprint"]


@pytest.mark.slow
def test_cls_linear_probe_is_deterministic_and_split_file_reuses_the_split(data, tmp_path):
    a = run(_cfg(data, tmp_path / "a", task="cls", dataset="covidx", epochs=2, seeds=(3,)))
    # the second run reads the first run's split folder: same split, same numbers, same fingerprint
    b = run(_cfg(data, tmp_path / "b", task="cls", dataset="covidx", epochs=2, seeds=(3,),
                 split_file=str(tmp_path / "a" / "out" / "split")))
    assert a["split"]["sha256"] == b["split"]["sha256"]
    assert a["per_seed"][0]["test"] == b["per_seed"][0]["test"]
    assert a["fingerprint"] == b["fingerprint"]
    assert a["fraction_sizes"] == b["fraction_sizes"]
    pa = (tmp_path / "a" / "out" / "seeds" / "seed-3.predictions.csv").read_bytes()
    assert pa == (tmp_path / "b" / "out" / "seeds" / "seed-3.predictions.csv").read_bytes()


@pytest.mark.slow
def test_cli_cls_covidx_finetune_with_encoder_pt(data, tmp_path, encoder_pt):
    from cli import cli

    out = tmp_path / "cli"
    args = ["eval", "--task", "cls", "--dataset", "covidx", "--root", str(data / "covidx"), "--out", str(out),
            "--init", str(encoder_pt), "--fraction", "0.5", "--seeds", "0", "--finetune", "--epochs", "1",
            "--batch-size", "4", "--image-size", str(SIZE)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "test accuracy" in r.output and "(tool)" in r.output
    res, md = _results(out)
    assert res["checkpoint_sha256"] == file_sha256(encoder_pt)
    assert res["checkpoint_layout"] == "torchvision"
    assert res["finetune"] is True and res["hyperparameters"]["normalize"] == "half"
    again = recompute_cls(out / "seeds" / "seed-0.predictions.csv", "multiclass")
    assert res["per_seed"][0]["test"]["accuracy"] == pytest.approx(again["accuracy"], abs=1e-12)
    assert res["per_seed"][0]["test"]["auroc"] == pytest.approx(again["auroc"], abs=1e-9)
    assert res["summary"]["accuracy"]["mean"] == pytest.approx(again["accuracy"])
    assert res["class_names"] == ["normal", "pneumonia", "COVID-19"]
    assert res["fraction_sizes"]["0"] < res["split"]["counts"]["train"]
    assert "encoder.pt" in md[2] and res["checkpoint_sha256"][:12] in md[2]

    # bad input is one error line and exit code 2
    bad = CliRunner().invoke(cli, args[:-2] + ["--image-size", "8"])
    assert bad.exit_code == 2 and "--image-size: must be in" in bad.output  # the option as typed
    missing = CliRunner().invoke(cli, ["eval", "--task", "seg", "--dataset", "covidx", "--root",
                                       str(data / "covidx"), "--out", str(tmp_path / "x"), "--init", "random"])
    assert missing.exit_code == 2 and "error:" in missing.output


@pytest.mark.slow
def test_mgca_draws_one_fraction_for_every_seed_and_records_it_in_the_split(data, tmp_path):
    res = run(_cfg(data, tmp_path, task="cls", dataset="covidx", protocol="mgca", seeds=(0, 1), fraction=0.5))
    out = tmp_path / "out"
    assert res["fraction_files"]["0"] == res["fraction_files"]["1"]
    assert res["fraction_files"]["0"]["file"] == "train-frac0.5.txt" and res["fraction_files"]["0"]["seed"] is None
    assert sorted(p.name for p in (out / "split").glob("train-frac*")) == ["train-frac0.5.txt"]
    split_json = json.loads((out / "split" / "split.json").read_text())
    assert split_json["scheme"] == "mgca" and [f["file"] for f in split_json["fractions"]] == ["train-frac0.5.txt"]
    assert res["split"]["scheme"] == "mgca" and res["leaks"] == res["split"]["leaks"]
    a, b = (out / "seeds" / f"seed-{s}.predictions.csv" for s in (0, 1))
    assert a.read_text() != b.read_text()  # same images, another head initialisation and data order
    hp = res["hyperparameters"]
    assert (hp["features"], hp["train_transform"], hp["eval_transform"], hp["resize"]) == (
        "per-epoch", "crop", "center-crop", "pad")
    assert hp["load_size"] == 73 and hp["image_size"] == SIZE  # 64 x 8/7, then cropped to 64
    # the split folder is a --split-file for another run under the same protocol: same lists, same fraction
    again = run(_cfg(data, tmp_path / "again", task="cls", dataset="covidx", protocol="mgca", seeds=(0,),
                     fraction=0.5, split_file=str(out / "split")))
    assert again["split"]["sha256"] == res["split"]["sha256"]
    assert again["fraction_files"]["0"]["sha256"] == res["fraction_files"]["0"]["sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["tool", "mgca"])
def test_seg_siim_dice_recomputes_from_the_masks(data, tmp_path, encoder_pt, protocol):
    res = run(_cfg(data, tmp_path, task="seg", dataset="siim", init=str(encoder_pt), protocol=protocol))
    assert res["primary_metric"] == "dice"
    t = res["per_seed"][0]["test"]
    doc = json.loads((tmp_path / "out" / "seeds" / "seed-0.predictions.json").read_text())
    assert [im["image_id"] for im in doc["images"]] == (tmp_path / "out" / "split" / "test.txt").read_text().split()
    assert doc["image_size"] == SIZE and all(im["pred"]["size"] == [SIZE, SIZE] for im in doc["images"])
    assert t["dice"] == pytest.approx(recompute_seg(tmp_path / "out" / "seeds" / "seed-0.predictions.json"), abs=1e-9)
    assert t["n_images"] == res["split"]["counts"]["test"] == len(doc["images"])
    assert "empty" in res["metric_definitions"]["dice"] and "dice_pooled" in res["metric_definitions"]
    hp = res["hyperparameters"]
    assert hp["frozen_encoder"] is True
    assert (hp["encoder_bn"], hp["soft_masks"], hp["monitor"]) == (
        ("train", True, "loss") if protocol == "mgca" else ("fixed", False, "dice"))


@pytest.mark.slow
def test_det_rsna_fasterrcnn_map_recomputes_with_pycocotools(data, tmp_path):
    res = run(_cfg(data, tmp_path, task="det", dataset="rsna", epochs=2))
    assert res["primary_metric"] == "map_40_75"
    t = res["per_seed"][0]["test"]
    path = tmp_path / "out" / "seeds" / "seed-0.predictions.json"
    doc = json.loads(path.read_text())
    assert len(doc["images"]) == t["n_images"] == res["split"]["counts"]["test"]
    assert sum(len(im["truth"]) for im in doc["images"]) == t["n_gt_boxes"]
    assert t["map_40_75"] == pytest.approx(recompute_det(path), abs=1e-6)  # torchmetrics computes in float32
    assert t["map_50"] == pytest.approx(recompute_det(path, (0.5,)), abs=1e-6)  # torchmetrics computes in float32
    _same_or_both_undefined(t["map_40_75_mgca"], recompute_det(path, min_score=0.5, skip=True))
    assert "0.40:0.75" in res["metric_definitions"]["map_40_75"]
    assert "map_40_75_mgca" in res["summary"] and "map_40_75_mgca" in res["metric_definitions"]
    assert res["per_seed"][0]["bn_calibration_images"] == res["fraction_sizes"]["0"]


def _same_or_both_undefined(ours, recomputed):
    if recomputed is None:
        assert ours is None  # undefined (no image with ground truth and a box scoring >= 0.5): null in JSON
    else:
        assert ours == pytest.approx(recomputed, abs=1e-9)


@pytest.mark.slow
def test_det_object_cxr_retinanet_finetuned(data, tmp_path):
    res = run(_cfg(data, tmp_path, task="det", dataset="object-cxr", det_model="retinanet", finetune=True))
    t = res["per_seed"][0]["test"]
    assert res["hyperparameters"]["head"] == "retinanet" and res["hyperparameters"]["encoder_bn"] == "fixed"
    # The detection body's BN is frozen even when fine-tuned: a random body gets estimated statistics.
    assert res["per_seed"][0]["bn_calibration_images"] == res["fraction_sizes"]["0"]
    path = tmp_path / "out" / "seeds" / "seed-0.predictions.json"
    assert t["map_40_75"] == pytest.approx(recompute_det(path), abs=1e-6)  # float32: 1.8e-9 apart on AVX-512
    assert res["split"]["protocol"]  # the split says how it was made (dev.csv is the test set)


# Every pair under every protocol it has: MGCA's seven pairs (the paper's tables) under mgca here, and
# under tool here or in the tests above (cls chexpert/covidx, seg siim, det rsna/object-cxr); the pairs
# only this tool has run under tool.
PAIRS = [("cls", "chexpert", "mgca"), ("cls", "rsna", "mgca"), ("cls", "covidx", "mgca"), ("seg", "siim", "mgca"),
         ("seg", "rsna", "mgca"), ("det", "rsna", "mgca"), ("det", "object-cxr", "mgca"),
         ("cls", "rsna", "tool"), ("seg", "rsna", "tool"), ("cls", "siim", "tool"), ("cls", "object-cxr", "tool")]


@pytest.mark.slow
@pytest.mark.parametrize("task,dataset,protocol", PAIRS)
def test_every_task_dataset_pair_runs_under_its_protocols(data, tmp_path, task, dataset, protocol):
    cfg = _cfg(data, tmp_path, task=task, dataset=dataset, protocol=protocol, batch_size=None, fraction=0.5)
    res = run(cfg)
    hp = res["hyperparameters"]
    assert res["protocol"] == hp["protocol"] == protocol
    assert hp == cfg.recipe(res["label_kind"]).as_dict()  # what ran is the recipe, recorded
    pred = tmp_path / "out" / "seeds" / res["per_seed"][0]["predictions"]
    t = res["per_seed"][0]["test"]
    if task == "cls":
        again = recompute_cls(pred, res["label_kind"])
        for k, v in again.items():
            assert t[k] == pytest.approx(v, abs=1e-9) if v is not None else t[k] is None
    elif task == "seg":
        assert t["dice"] == pytest.approx(recompute_seg(pred), abs=1e-9)
    else:
        assert t["map_40_75"] == pytest.approx(recompute_det(pred), abs=1e-6)
        _same_or_both_undefined(t["map_40_75_mgca"], recompute_det(pred, min_score=0.5, skip=True))
        assert res["primary_metric"] == ("map_40_75_mgca" if protocol == "mgca" else "map_40_75")
        assert hp["head"] == ("yolov3" if protocol == "mgca" else "fasterrcnn")
    if protocol == "mgca":
        assert hp["epochs"] == 1 and hp["patience"] == 10 and hp["normalize"] == "half"
        assert hp["batch_size"] == {"cls": 48, "seg": 16 if dataset == "rsna" else 8, "det": 16}[task]
    else:
        assert hp["batch_size"] == 16 and hp["monitor"] == res["primary_metric"]


def test_config_validation_names_the_field(tmp_path):
    good = dict(task="cls", dataset="covidx", root=str(tmp_path), out=str(tmp_path / "o"), init="random")
    with pytest.raises(ConfigError, match="image_size: the YOLOv3 head needs a multiple of 32"):
        EvalConfig(**{**good, "task": "det", "dataset": "rsna", "protocol": "mgca", "image_size": 100})
    assert EvalConfig(**{**good, "task": "det", "dataset": "rsna", "image_size": 100}).recipe().head == "fasterrcnn"
    with pytest.raises(ConfigError, match="protocol: MGCA has no cls siim recipe"):
        EvalConfig(**{**good, "dataset": "siim", "protocol": "mgca"})
    for field, value in (("task", "clf"), ("fraction", 0.0), ("seeds", ()), ("image_size", 16),
                         ("det_model", "yolo"), ("init", str(tmp_path / "nope.pt")), ("lr", -1.0),
                         ("protocol", "paper"), ("batch_size", 0), ("weight_decay", -1e-4)):
        with pytest.raises(ConfigError, match=field):
            EvalConfig(**{**good, field: value})
    assert EvalConfig(**{**good, "init": "imagenet"}).recipe().normalize == "imagenet"
    assert EvalConfig(**{**good, "init": "imagenet", "protocol": "mgca"}).recipe().normalize == "half"
    assert EvalConfig(**good).effective()["epochs"] == 100
    assert EvalConfig(**{**good, "finetune": True}).effective()["epochs"] == 10
    assert EvalConfig(**{**good, "protocol": "mgca"}).effective()["epochs"] == 50
