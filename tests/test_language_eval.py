"""Zero-shot classification and retrieval (``eval --task zeroshot|retrieval``): the learn-or-fail proof on an
easy world, the protocols' selections and prompts against independent recomputations, the one-line errors,
the pipeline wiring and the report's verdict rows."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.downstream import prompts as pr
from pipeline.downstream.datasets.registry import load_dataset
from pipeline.downstream.mgca_splits import chexpert_5x200
from pipeline.downstream.prompts import PromptsError, load_prompts_file
from pipeline.report.build import language_checks
from tests import _language_world as lw

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", "-q", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


# --------------------------------------------------------------------------- the easy world, trained once
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shards + reports + a small random BERT + its embed-text cache + a CheXpert-layout zero-shot set, and a
    short M-FLAG run (orthogonality weight 0.01, near the equal-gradient point) on it."""
    import torch

    from pipeline.text.models import build_tiny_bert
    from stages import embed_text
    from stages import train_vision as tv

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("language")
    w = lw.write_pretraining(root)
    build_tiny_bert(w["texts"], root / "bert", hidden=32, layers=1, heads=2, vocab_size=200)
    res = embed_text.run(embed_text.EmbedTextConfig(reports=str(w["reports"]), out=str(root / "cache"),
                                                    model=str(root / "bert"), pooling="mean", max_length=64,
                                                    device="cpu"))
    lw.write_chexpert(root / "chexpert")

    def train(name: str, **over) -> Path:
        out = root / f"run-{name}"
        tv.run(tv.TrainVisionConfig(
            shards=str(w["shards"]), text_cache=str(res.cache_dir), out=str(out), batch_size=16, image_size=40,
            crop_size=32, num_workers=0, shuffle_buffer=64, aug="none", hidden_dim=256, proj_dim=64, lr=1e-3,
            max_steps=120, warmup_steps=5, log_every=10, ckpt_every=1000, probe_every=1000, probe_size=8,
            final_probe_size=64, keep_checkpoints=0, threads=1, precision="fp32", device="cpu", seed=0, **over))
        return out

    return {"root": root, "cache": res.cache_dir, "shards": w["shards"], "chexpert": root / "chexpert",
            "bert": root / "bert", "prompts": lw.write_prompts(root / "prompts.json"),
            "shuffled": lw.write_prompts(root / "shuffled.json", shuffle=True), "train": train,
            "mflag": train("mflag", orth_weight=0.01)}


def _zeroshot(world, out: Path, init, prompts, **over) -> dict:
    from stages import evaluate

    kw = dict(task="zeroshot", dataset="chexpert", root=str(world["chexpert"]), out=str(out), init=str(init),
              zeroshot_protocol="binary", prompts=str(prompts), text_cache=str(world["cache"]), image_size=32,
              bootstrap=200)
    kw.update(over)
    return evaluate.run(evaluate.EvalConfig(**kw))


def _retrieval(world, out: Path, init) -> dict:
    from stages import evaluate

    return evaluate.run(evaluate.EvalConfig(task="retrieval", shards=str(world["shards"]), out=str(out),
                                            init=str(init), split="heldout", text_cache=str(world["cache"]),
                                            image_size=32, bootstrap=200))


@pytest.mark.slow
def test_language_supervision_is_learnt_and_its_controls_stay_at_chance(world, tmp_path):
    # M-FLAG learns to put each finding's image near its report phrase: zero-shot through the text space works
    zs = _zeroshot(world, tmp_path / "zs", world["mflag"], world["prompts"])
    auroc = zs["summary"]["auroc"]["mean"]
    assert auroc >= 0.9, zs["per_seed"][0]["test"]["auroc_per_class"]
    # ... and the held-out pairs align: own report far above the others, loss below both baselines
    rt = _retrieval(world, tmp_path / "rt", world["mflag"])["per_seed"][0]["test"]
    assert rt["own_vs_other_auroc"] >= 0.95 and rt["own_vs_other_auroc_ci"][0] > 0.9
    assert rt["align_true_pair"] < 0.5 * min(rt["align_constant"], rt["align_shuffled"])
    assert language_checks(zs["per_seed"][0]["test"], rt)["shows"]

    # controls: the same model with each finding's prompt swapped for another finding's, a random model,
    # and a run without the alignment term (orthogonality only): none of them reads the findings
    controls = {
        "shuffled prompts": _zeroshot(world, tmp_path / "zs-shuffled", world["mflag"], world["shuffled"]),
        "random init": _zeroshot(world, tmp_path / "zs-random", "random", world["prompts"], seeds=(0, 1)),
    }
    orth_only = world["train"]("orth-only", align_weight=0.0)
    controls["orth-only"] = _zeroshot(world, tmp_path / "zs-orth", orth_only, world["prompts"])
    for name, res in controls.items():
        mean = res["summary"]["auroc"]["mean"]
        assert 0.3 <= mean <= 0.7 and auroc - mean >= 0.25, (name, mean)
    rt_orth = _retrieval(world, tmp_path / "rt-orth", orth_only)["per_seed"][0]["test"]
    assert rt_orth["own_vs_other_auroc"] < 0.7
    assert not language_checks(controls["orth-only"]["per_seed"][0]["test"], rt_orth)["shows"]

    # the metrics recompute from the predictions on disk (sklearn), and from the retrieval score matrix
    out = tmp_path / "zs"
    with open(out / zs["predictions"]["0"], newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    per = [roc_auc_score([float(r[f"label:{c}"]) for r in rows], [float(r[f"score:{c}"]) for r in rows])
           for c in lw.FINDINGS]
    assert np.isclose(np.mean(per), auroc, atol=1e-12)
    from pipeline.downstream.language_metrics import own_vs_other_auroc

    seed = json.loads((tmp_path / "rt" / "seeds" / "seed-0.json").read_text())
    scores = np.load(tmp_path / "rt" / "seeds" / seed["scores"])
    groups = json.loads((tmp_path / "rt" / "seeds" / seed["predictions"]).read_text())["text_groups"]
    assert np.isclose(own_vs_other_auroc(scores, groups)["mean"], rt["own_vs_other_auroc"], atol=1e-6)


@pytest.mark.slow
def test_chexpert_5x200_protocol_classifies_by_the_closest_class_prompts(world, tmp_path):
    # the easy set's train.csv rows each have one competition finding or none: MGCA's rule draws from them
    prompts = tmp_path / "classes.yaml"
    prompts.write_text("".join(f"{f}: ['{lw.phrase(f)}']\n" for f in lw.FINDINGS), encoding="utf-8")
    res = _zeroshot(world, tmp_path / "fx", world["mflag"], prompts, zeroshot_protocol="chexpert5x200",
                    zeroshot_per_class=4)
    test = res["per_seed"][0]["test"]
    assert res["primary_metric"] == "accuracy" and test["accuracy"] >= 0.8, test
    assert sum(map(sum, test["confusion_matrix"])) == test["n"] == res["n_images"]
    # the built-in prompts are GLoRIA's; a rerun of the finished configuration is read back, not recomputed
    again = _zeroshot(world, tmp_path / "fx", world["mflag"], prompts, zeroshot_protocol="chexpert5x200",
                      zeroshot_per_class=4)
    assert again["finished"] == res["finished"]


@pytest.mark.slow
def test_errors_are_one_line_each(world, tmp_path):
    base = ["eval", "--task", "zeroshot", "--dataset", "chexpert", "--root", world["chexpert"],
            "--zeroshot-protocol", "binary", "--image-size", "32"]
    # a text model other than the one that made the run's cache
    other = tmp_path / "other-bert"
    from pipeline.text.models import build_tiny_bert

    build_tiny_bert(["a completely different vocabulary", "of other words"], other, hidden=32, layers=1, heads=2,
                    vocab_size=120)
    line = _one_error_line(_cli(*base, "--init", world["mflag"], "--prompts", world["prompts"], "--text-model", other,
                                "--out", tmp_path / "e1"))
    assert "tokenizer_hash" in line and "training cache" in line
    # a run folder without its projector
    broken = tmp_path / "no-projector"
    shutil.copytree(world["mflag"], broken)
    (broken / "projector.pt").unlink()
    line = _one_error_line(_cli(*base, "--init", broken, "--prompts", world["prompts"], "--out", tmp_path / "e2"))
    assert "projector.pt" in line and str(broken) in line
    # a prompts file with an unknown class, and one with an empty class
    bad = tmp_path / "bad.yaml"
    bad.write_text("Pneumonia: {positive: [pneumonia.], negative: [none.]}\n", encoding="utf-8")
    line = _one_error_line(_cli(*base, "--init", world["mflag"], "--prompts", bad, "--out", tmp_path / "e3"))
    assert "unknown class 'Pneumonia'" in line and str(bad) in line
    data = json.loads(Path(world["prompts"]).read_text())
    data["Edema"]["positive"] = []
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(data), encoding="utf-8")
    line = _one_error_line(_cli(*base, "--init", world["mflag"], "--prompts", empty, "--out", tmp_path / "e4"))
    assert "'Edema' positive" in line and "no prompt" in line
    # random init needs a text cache to be shaped for
    line = _one_error_line(_cli(*base, "--init", "random", "--out", tmp_path / "e5"))
    assert "text_cache" in line or "--text-cache" in line


# --------------------------------------------------------------------------- protocols against independent code
def _hand_made_chexpert(root: Path) -> None:
    """train.csv rows covering MGCA's 5x200 rule: blanks, -1, laterals, other observations, two positives."""
    header = lw.CHEXPERT_HEADER
    rng = np.random.default_rng(3)
    rows = []
    for i in range(400):
        cells = {c: "" for c in header}
        view = "Lateral" if i % 7 == 0 else "Frontal"
        cells.update({"Path": f"CheXpert-v1.0-small/train/patient{i:05d}/study1/view1_{view.lower()}.jpg",
                      "Sex": "Male", "Age": "60", "Frontal/Lateral": view, "AP/PA": "AP" if view == "Frontal" else ""})
        for c in header[5:]:
            cells[c] = str(rng.choice(["", "", "", "0.0", "0.0", "1.0", "-1.0"], p=[.3, .2, .1, .2, .1, .05, .05]))
        k = int(rng.integers(0, 5))
        if rng.random() < 0.6:  # make many rows single-positive candidates
            for c in (*lw.FINDINGS, "Enlarged Cardiomediastinum", "Lung Lesion", "Lung Opacity", "Pneumonia",
                      "Pneumothorax", "Pleural Other", "Fracture", "Support Devices"):
                cells[c] = str(rng.choice(["", "0.0"]))
            cells[lw.FINDINGS[k]] = "1.0"
        rows.append([cells[c] for c in header])
    root.mkdir(parents=True, exist_ok=True)
    for name, body in (("train.csv", rows), ("valid.csv", rows[:20])):
        with open(root / name, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(body)


def test_chexpert_5x200_selection_is_mgcas_pandas_rule(tmp_path):
    pd = pytest.importorskip("pandas")
    _hand_made_chexpert(tmp_path)
    spec = load_dataset("chexpert", tmp_path, "cls", protocol="mgca", require_images=False)
    picked, n = chexpert_5x200(spec.label_rows, 7)
    # MGCA's preprocess/chexpert.py, written here with pandas as it does
    others = ["Enlarged Cardiomediastinum", "Lung Lesion", "Lung Opacity", "Pneumonia", "Pneumothorax",
              "Pleural Other", "Fracture", "Support Devices"]
    df = pd.read_csv(tmp_path / "train.csv")
    df[[*lw.FINDINGS, *others]] = df[[*lw.FINDINGS, *others]].fillna(0)  # MGCA: df.fillna(0)
    df = df[df["Frontal/Lateral"] == "Frontal"]
    expected = []
    for k in range(len(lw.FINDINGS)):
        index = np.zeros(5)
        index[k] = 1
        sel = df[(df[list(lw.FINDINGS)].values == index).all(axis=1) & (df[others] == 0).all(axis=1)]
        expected += [(p.split("CheXpert-v1.0-small/", 1)[1], k) for p in sel.sample(n=7, random_state=0)["Path"]]
    assert n == 7 and picked == expected


def test_gloria_prompts_are_gloria_draw_and_pools():
    # GLoRIA's pools (gloria/constants.py): the product of its word lists, Pleural Effusion in its own key order
    assert {c: len(pr.gloria_pool(c)) for c in pr.CHEXPERT_CLASS_PROMPTS} == {
        "Atelectasis": 210, "Cardiomegaly": 15, "Consolidation": 192, "Edema": 18, "Pleural Effusion": 54}
    assert "small left bilateral pleural effusion" in pr.gloria_pool("Pleural Effusion")
    # seed 0 is GLoRIA's own draw (random.seed(6), random.sample(pool, 5) per class in order), computed apart
    draw = pr.gloria_class_prompts(5, seed=0)
    assert draw["Atelectasis"][0] == "minimal residual atelectasis at the left lung zone"
    assert draw["Edema"] == [" pulmonary edema ", "improvement in pulmonary interstitial edema ",
                             "decreased pulmonary edema ", "moderate pulmonary edema ", "mild pulmonary edema "]
    assert draw["Pleural Effusion"][-1] == " tiny bilateral pleural effusion"
    assert pr.gloria_class_prompts(5, seed=1) != draw
    assert pr.binary_prompts(["Edema"]) == {"Edema": {"positive": ["Edema"], "negative": ["no Edema"]}}


def test_prompts_file_checks(tmp_path):
    good = tmp_path / "p.yaml"
    good.write_text("A: [a one, a two]\nB: b\n", encoding="utf-8")
    assert load_prompts_file(good, ["A", "B"], "chexpert5x200") == {"A": ["a one", "a two"], "B": ["b"]}
    for text, msg in (("A: [x]\n", "no prompts for class 'B'"), ("A: [x]\nB: [y]\nC: [z]\n", "unknown class 'C'"),
                      ("A: [x]\nB: ['  ']\n", "class 'B': no prompt"), ("- x\n", "expected a mapping")):
        good.write_text(text, encoding="utf-8")
        with pytest.raises(PromptsError, match=msg):
            load_prompts_file(good, ["A", "B"], "chexpert5x200")
    good.write_text("A: [x]\nB: [y]\n", encoding="utf-8")
    with pytest.raises(PromptsError, match="positive"):
        load_prompts_file(good, ["A", "B"], "binary")


def test_retrieval_labels_keep_studies_with_one_competition_finding(tmp_path):
    import gzip

    from pipeline.downstream.retrieval import _precision_at_k, read_study_classes

    path = tmp_path / "labels.csv.gz"
    header = "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,No Finding,Pleural Effusion\n"
    rows = ["1,51,1.0,,0.0,,,\n", "1,52,,1.0,,,,\n", "2,53,1.0,1.0,,,,\n", "2,54,,,,,1.0,\n", "3,55,-1.0,,,1.0,,\n",
            "3,56,,,,,,1.0\n"]
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(header + "".join(rows))
    assert read_study_classes(path) == {"51": 0, "52": 1, "55": 3, "56": 4}
    # two Atelectasis pairs that retrieve each other first, a Cardiomegaly pair that retrieves an Atelectasis one
    studies = ["51", "52", "53", "57"]
    scores = np.array([[1.0, 0.1, 0.0, 0.9], [0.9, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    path2 = tmp_path / "l2.csv"
    path2.write_text("study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Pleural Effusion\n51,1,,,,\n52,,1,,,\n"
                     "57,1,,,,\n", encoding="utf-8")
    p = _precision_at_k(scores, studies, str(path2))
    # pairs kept: 51 (Atel), 52 (Card), 57 (Atel); query 51's top-1 of {51, 52, 57} is itself, etc.
    assert p["n_pairs_with_class"] == 3 and p["image_to_text_P@5"] == pytest.approx((2 / 3 + 1 / 3 + 2 / 3) / 3)
    assert p["chance_P"] == pytest.approx((2 / 3 + 1 / 3 + 2 / 3) / 3)


# --------------------------------------------------------------------------- the report's verdict on fixed inputs
def test_language_checks_say_whether_the_language_shows():
    learnt_zs = {"auroc_per_class": {"Atelectasis": 0.81, "Cardiomegaly": 0.74, "Edema": 0.70, "Consolidation": 0.52}}
    learnt_rt = {"align_true_pair": 2.0, "align_constant": 3.8, "align_shuffled": 2.8,
                 "align_true_minus_shuffled_ci": [-0.9, -0.7], "own_vs_other_auroc_ci": [0.56, 0.61]}
    c = language_checks(learnt_zs, learnt_rt)
    assert c["shows"] and c["findings_above"] == ["Atelectasis", "Cardiomegaly", "Edema"]
    # the null: a model whose loss only beats the constant, or sits at chance, or two findings only
    null_rt = {"align_true_pair": 2.56, "align_constant": 1.73, "align_shuffled": 2.57,
               "align_true_minus_shuffled_ci": [-0.02, 0.01], "own_vs_other_auroc_ci": [0.47, 0.53]}
    c = language_checks({"auroc_per_class": {"Atelectasis": 0.66, "Edema": 0.31}}, null_rt)
    assert not c["shows"] and (c["zeroshot"], c["loss"], c["own_vs_other"]) == (False, False, False)
    two = {"auroc_per_class": {"Atelectasis": 0.9, "Edema": 0.9, "Cardiomegaly": 0.69}}
    assert language_checks(two, learnt_rt)["zeroshot"] is False
    assert language_checks(None, None)["shows"] is False


def test_report_renders_language_rows_and_claims(tmp_path):
    from pipeline.report import build as reporting

    def write(label: str, init: str, task: str, primary: str, tests: dict[int, dict]) -> tuple[str, str]:
        d = tmp_path / label / init
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({
            "task": task, "primary_metric": primary, "fraction": None,
            "per_seed": [{"seed": s, "test": t} for s, t in tests.items()]}))
        return f"eval:{label}:{init}", str(d)

    zs = lambda a: {"auroc": a, "auroc_ci": [a - .05, a + .05], "n_images": 700,  # noqa: E731
                    "auroc_per_class": {"Atelectasis": a, "Edema": a, "Cardiomegaly": a}}
    rt = lambda own, t: {"own_vs_other_auroc": own, "own_vs_other_auroc_ci": [own - .03, own + .03],  # noqa: E731
                         "align_true_pair": t, "align_constant": 3.8, "align_shuffled": 2.9,
                         "align_true_minus_shuffled": t - 2.9, "align_true_minus_shuffled_ci": [t - 3.0, t - 2.8],
                         "image_to_text_R@1": 0.01, "chance_R@1": 0.002, "n_pairs": 500, "n_distinct_texts": 480}
    evals = [write("zeroshot-binary-chexpert", "random", "zeroshot", "auroc", {0: zs(.5), 1: zs(.49)}),
             write("zeroshot-binary-chexpert", "mflag", "zeroshot", "auroc", {0: zs(.78), 1: zs(.8)}),
             write("retrieval-heldout", "random", "retrieval", "own_vs_other_auroc", {0: rt(.5, 2.9), 1: rt(.5, 2.9)}),
             write("retrieval-heldout", "mflag", "retrieval", "own_vs_other_auroc", {0: rt(.6, 2.2), 1: rt(.62, 2.1)})]
    data = reporting.collect([], evals, "random", "mflag")
    text = "\n".join(reporting._language_section(data["evals"]))
    rows = [ln for ln in text.splitlines() if ln.startswith("| mflag") or ln.startswith("| random")]
    assert len(rows) == 4
    assert all(r.endswith("**yes** |") for r in rows if r.startswith("| mflag"))
    assert all("no (zeroshot, loss, own_vs_other)" in r for r in rows if r.startswith("| random"))
    claims = {(c["claim"], c["measure"]) for c in data["claims"]}
    assert ("pre-training beats random init", "zeroshot-binary-chexpert auroc") in claims


# --------------------------------------------------------------------------- the pipeline wiring
def test_pipeline_wires_zeroshot_and_retrieval_to_each_run_folder(tmp_path):
    from stages.orchestrate import build_nodes, load_spec

    spec_path = tmp_path / "p.yaml"
    text = (REPO / "configs" / "tiny-test.yaml").read_text(encoding="utf-8").replace("workdir: runs/tiny",
                                                                                       f"workdir: {tmp_path}/w")
    text = text.replace("    - {task: cls, dataset: chexpert}",
                        "    - {task: cls, dataset: chexpert}\n"
                        "    - {task: zeroshot, dataset: chexpert, zeroshot_protocol: binary}\n"
                        "    - {task: retrieval, split: heldout}")
    spec_path.write_text(text, encoding="utf-8")
    nodes = {n.name: n for n in build_nodes(load_spec(spec_path))}
    rt = nodes["eval:retrieval-heldout:mflag"]
    assert rt.params["shards"] == "@prepare" and rt.params["text_cache"] == "@cache" and rt.params["root"] is None
    assert set(rt.deps) >= {"train:mflag", "prepare", "embed-text"}
    zs = nodes["eval:zeroshot-binary-chexpert:random"]
    assert zs.params["text_model"] == "@text-model/model" and "synth:chexpert" in zs.deps
    # the trained task's parameters are what they were (its fingerprint must not change)
    assert "text_cache" not in nodes["eval:cls-chexpert:mflag"].params
