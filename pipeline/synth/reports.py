"""Synthetic radiology reports in the MIMIC-CXR text layout, and a CheXpert-style labeler.

``make_report`` writes sentences from ``Findings`` with negations, uncertainty, laterality, severity
and comparison wording. Every sentence carries the CheXpert labels it mentions and its polarity, so
the report's labels are known by construction; ``label_report`` is an independent rule-based labeler
over the text (sentence-level keyword + negation/uncertainty cues, as the CheXpert labeler does)
and the tests check that both agree.
"""
from __future__ import annotations

import dataclasses
import re
import textwrap

import numpy as np

from pipeline.synth.phantom import LOBES, Findings, Opacity, Sided
from pipeline.text.sections import extract_sections

# Column order of mimic-cxr-2.0.0-chexpert.csv (FORMATS.md section 1).
CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)
# Labels whose positive or uncertain mention rules out "No Finding".
PATHOLOGIES = tuple(x for x in CHEXPERT_LABELS if x not in ("No Finding", "Support Devices"))

_KEYWORDS: dict[str, re.Pattern] = {
    "Atelectasis": re.compile(r"atelecta"),
    "Cardiomegaly": re.compile(
        r"cardiomegaly|heart (?:size )?is (?:\w+ )?enlarged|enlarged heart|heart size is normal"
        r"|normal heart size|cardiac silhouette is (?:\w+ )?enlarged"),
    "Consolidation": re.compile(r"consolidat"),
    "Edema": re.compile(r"edema"),
    "Enlarged Cardiomediastinum": re.compile(r"cardiomediastinal|mediastinal contour"),
    "Fracture": re.compile(r"fracture"),
    "Lung Lesion": re.compile(r"nodul|\bmass\b"),
    "Lung Opacity": re.compile(r"opacit|opacification"),
    "Pleural Effusion": re.compile(r"effusion"),
    "Pleural Other": re.compile(r"pleural thickening"),
    "Pneumonia": re.compile(r"pneumonia"),
    "Pneumothorax": re.compile(r"pneumothora"),
    "Support Devices": re.compile(r"endotracheal tube|enteric tube|nasogastric tube|\bpicc\b|pacemaker"),
}
_UNCERTAIN = re.compile(
    r"\b(?:possible|possibly|cannot be excluded|cannot exclude|may|might|could|likely|suggests?"
    r"|suggestive|concerning for|questionable|versus|probable|equivocal)\b")
_NEGATED = re.compile(r"\b(?:no|not|without|free of|resolved|negative for|normal)\b")

SIZE_WORDS = {1: "small", 2: "moderate", 3: "large"}
SEV_WORDS = {1: "mild", 2: "moderate", 3: "severe"}
SEV_ADVERBS = {1: "mildly", 2: "moderately", 3: "severely"}
SIDE_WORDS = {"R": "right", "L": "left"}


@dataclasses.dataclass
class Report:
    """A report's text, the sections ``extract_sections`` returns for it, and its CheXpert labels
    (label -> 1.0 / 0.0 / -1.0, or None for not mentioned)."""

    text: str
    sections: dict[str, str]
    labels: dict[str, float | None]


@dataclasses.dataclass
class _Sentence:
    text: str
    labels: tuple[str, ...] = ()
    value: float | None = None  # 1.0 / 0.0 / -1.0 for all of ``labels``


# --------------------------------------------------------------------------- labeler
def split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=\.)\s+", " ".join(text.split())) if s]


def label_sentences(sentences: list[str]) -> dict[str, float | None]:
    """Sentence-level CheXpert-style labeling: keyword, then uncertainty, then negation cues.

    Aggregation per label as the CheXpert labeler: any positive -> 1.0, else any uncertain -> -1.0,
    else any negative -> 0.0, else None. "No Finding" is 1.0 when some text was labeled and no
    pathology is positive or uncertain.
    """
    found: dict[str, set[float]] = {name: set() for name in CHEXPERT_LABELS}
    for s in sentences:
        low = s.lower()
        hits = [name for name, pat in _KEYWORDS.items() if pat.search(low)]
        if not hits:
            continue
        value = -1.0 if _UNCERTAIN.search(low) else 0.0 if _NEGATED.search(low) else 1.0
        for name in hits:
            found[name].add(value)
    return _aggregate(found, bool(sentences))


def _aggregate(found: dict[str, set[float]], any_text: bool) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name in CHEXPERT_LABELS:
        vals = found.get(name, set())
        out[name] = 1.0 if 1.0 in vals else -1.0 if -1.0 in vals else 0.0 if 0.0 in vals else None
    if any_text and not any(out[p] in (1.0, -1.0) for p in PATHOLOGIES):
        out["No Finding"] = 1.0
    else:
        out["No Finding"] = None
    return out


def label_report(text: str) -> dict[str, float | None]:
    """Label a report's findings + impression sections (all aliases) with ``label_sentences``."""

    sec = extract_sections(text)
    body = " ".join(sec[k] for k in ("findings", "impression") if sec.get(k))
    return label_sentences(split_sentences(body))


def truth_labels(f: Findings) -> dict[str, float]:
    """What the image shows, as 0/1 CheXpert labels (used where a set has expert labels)."""
    kinds = {o.kind for o in f.opacities}
    lab = {name: 0.0 for name in CHEXPERT_LABELS}
    lab["Atelectasis"] = float("atelectasis" in kinds)
    lab["Cardiomegaly"] = float(f.cardiomegaly > 0)
    lab["Consolidation"] = float("consolidation" in kinds)
    lab["Edema"] = float(f.edema > 0)
    lab["Enlarged Cardiomediastinum"] = float(f.cardiomegaly >= 2)
    lab["Lung Lesion"] = float("nodule" in kinds)
    lab["Lung Opacity"] = float(bool(f.opacities) or f.edema > 0)
    lab["Pleural Effusion"] = float(bool(f.effusions))
    lab["Pneumonia"] = float(bool(kinds & {"consolidation", "ground-glass"}))
    lab["Pneumothorax"] = float(bool(f.pneumothoraces))
    lab["Support Devices"] = float(bool(f.devices))
    lab["No Finding"] = float(f.is_normal)
    return lab


# --------------------------------------------------------------------------- sentences
def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _sided(items: tuple[Sided, ...]) -> tuple[str, int]:
    """("right"/"left"/"bilateral", max severity)."""
    sides = {x.side for x in items}
    where = "bilateral" if len(sides) == 2 else SIDE_WORDS[next(iter(sides))]
    return where, max(x.severity for x in items)


def _change(rng: np.random.Generator, now: int, before: int | None) -> str:
    """A comparison clause for a finding present now (empty when no prior or by chance)."""
    if before is None or rng.random() < 0.3:
        return ""
    if before == 0:
        return _pick(rng, [" which is new since the prior study", " which is new"])
    if now > before:
        return _pick(rng, [" which has increased since the prior study", " which has worsened"])
    if now < before:
        return _pick(rng, [" which has decreased since the prior study", " which has improved"])
    return _pick(rng, [" which is unchanged", " which is similar to the prior study"])


def _opacity_sentences(o: Opacity, rng: np.random.Generator, prior: Findings | None):
    loc, sev = o.location, o.severity
    before = None
    if prior is not None:
        same = [p for p in prior.opacities if p.kind == o.kind and p.location == o.location]
        before = same[0].severity if same else 0
    chg = _change(rng, sev, before)
    findings, impression = [], []
    if o.kind == "consolidation":
        if sev == 1 and rng.random() < 0.5:
            s = _pick(rng, [f"Subtle opacity in the {loc} could reflect early consolidation.",
                            f"Early consolidation in the {loc} cannot be excluded.",
                            f"Possible subtle consolidation in the {loc}."])
            findings.append(_Sentence(s, _labels_in(s), -1.0))
            imp = f"Possible early {loc} pneumonia."
            impression.append(_Sentence(imp, ("Pneumonia",), -1.0))
        else:
            adj = {1: "patchy", 2: "focal", 3: "dense"}[sev]
            s = _pick(rng, [f"There is {adj} consolidation in the {loc}{chg}.",
                            f"{_cap(adj)} {loc} consolidation is present{chg}.",
                            f"{_cap(SEV_WORDS[sev])} {adj} opacity in the {loc}{chg}."])
            findings.append(_Sentence(s, _labels_in(s), 1.0))
            if rng.random() < 0.6:
                imp = _pick(rng, [f"{_cap(loc)} pneumonia.", f"{_cap(SEV_WORDS[sev])} {loc} pneumonia."])
                impression.append(_Sentence(imp, ("Pneumonia",), 1.0))
            else:
                impression.append(_Sentence("Findings are concerning for pneumonia.", ("Pneumonia",), -1.0))
    elif o.kind == "ground-glass":
        s = f"{_cap(SEV_WORDS[sev])} patchy peripheral ground-glass opacities in the {loc}{chg}."
        findings.append(_Sentence(s, ("Lung Opacity",), 1.0))
        impression.append(_Sentence("Findings may represent atypical or viral pneumonia.", ("Pneumonia",), -1.0))
    elif o.kind == "atelectasis":
        base = "right" if LOBES[loc][0] == "R" else "left"
        if sev == 1 and rng.random() < 0.4:
            s = f"Minimal {base} basilar opacity likely reflects atelectasis."
            findings.append(_Sentence(s, ("Lung Opacity", "Atelectasis"), -1.0))
        else:
            s = _pick(rng, [f"{_cap(SEV_WORDS[sev])} {base} basilar atelectasis{chg}.",
                            f"Plate-like atelectasis at the {base} lung base{chg}.",
                            f"There is {SEV_WORDS[sev]} atelectasis in the {loc}{chg}."])
            findings.append(_Sentence(s, ("Atelectasis",), 1.0))
            if rng.random() < 0.5:
                impression.append(_Sentence(f"{_cap(base)} basilar atelectasis.", ("Atelectasis",), 1.0))
    else:  # nodule
        mm = {1: 6, 2: 11, 3: 18}[sev]
        if rng.random() < 0.3:
            s = f"Possible {mm} mm nodule in the {loc}."
            findings.append(_Sentence(s, ("Lung Lesion",), -1.0))
        else:
            s = f"There is {'an' if mm in (11, 18) else 'a'} {mm} mm nodule in the {loc}{chg}."
            findings.append(_Sentence(s, ("Lung Lesion",), 1.0))
        impression.append(_Sentence(f"{_cap(loc)} nodule, for which chest CT is recommended.",
                                    ("Lung Lesion",), 1.0) if rng.random() < 0.5 else
                          _Sentence("Recommend chest CT for further evaluation.", (), None))
    return findings, impression


def _labels_in(sentence: str) -> tuple[str, ...]:
    low = sentence.lower()
    return tuple(name for name, pat in _KEYWORDS.items() if pat.search(low))


def _devices(f: Findings, rng: np.random.Generator) -> list[_Sentence]:
    out = []
    for dev in f.devices:
        if dev == "endotracheal tube":
            s = f"Endotracheal tube terminates {int(rng.integers(2, 7))} cm above the carina."
        elif dev == "enteric tube":
            s = _pick(rng, ["Enteric tube courses below the diaphragm with the tip in the stomach.",
                            "A nasogastric tube is seen with its tip in the stomach."])
        elif dev == "right PICC":
            s = _pick(rng, ["Right PICC line terminates in the mid SVC.",
                            "A right-sided PICC terminates at the cavoatrial junction."])
        else:
            s = "Left-sided pacemaker with leads terminating in the right atrium and right ventricle."
        out.append(_Sentence(s, ("Support Devices",), 1.0))
    return out


def _sentences(f: Findings, rng: np.random.Generator, prior: Findings | None):
    """(findings sentences, impression sentences) for ``f``."""
    fs: list[_Sentence] = []
    imp: list[_Sentence] = []
    devices = _devices(f, rng)
    devices_first = rng.random() < 0.6  # MIMIC reports usually list lines and tubes first
    # Lungs.
    for o in f.opacities:
        a, b = _opacity_sentences(o, rng, prior)
        fs += a
        imp += b
    if f.edema:
        before = prior.edema if prior is not None else None
        chg = _change(rng, f.edema, before)
        if f.edema == 1 and rng.random() < 0.4:
            s = "Mild pulmonary vascular congestion, possibly early interstitial edema."
            fs.append(_Sentence(s, ("Edema",), -1.0))
        else:
            s = _pick(rng, [f"{_cap(SEV_WORDS[f.edema])} pulmonary edema{chg}.",
                            f"There is {SEV_WORDS[f.edema]} interstitial edema{chg}."])
            fs.append(_Sentence(s, ("Edema",), 1.0))
            imp.append(_Sentence(f"{_cap(SEV_WORDS[f.edema])} pulmonary edema.", ("Edema",), 1.0))
    if f.effusions:
        where, sev = _sided(f.effusions)
        plural = "s" if where == "bilateral" else ""
        before = None
        if prior is not None:
            before = max((e.severity for e in prior.effusions), default=0)
        if sev == 1 and rng.random() < 0.4:
            s = f"Blunting of the {where} costophrenic angle{plural} may reflect a small effusion."
            fs.append(_Sentence(s, ("Pleural Effusion",), -1.0))
        else:
            chg = _change(rng, sev, before)
            s = f"{_cap(SIZE_WORDS[sev])} {where} pleural effusion{plural}{chg}."
            fs.append(_Sentence(s, ("Pleural Effusion",), 1.0))
            imp.append(_Sentence(f"{_cap(SIZE_WORDS[sev])} {where} pleural effusion{plural}.",
                                 ("Pleural Effusion",), 1.0))
    if f.pneumothoraces:
        where, sev = _sided(f.pneumothoraces)
        word = "pneumothoraces" if where == "bilateral" else "pneumothorax"
        if sev == 1 and rng.random() < 0.4:
            s = f"Possible tiny {where} apical {word}."
            fs.append(_Sentence(s, ("Pneumothorax",), -1.0))
        else:
            size = {1: "small", 2: "moderate", 3: "large"}[sev]
            s = _pick(rng, [f"There is a {size} {where} {word}." if word == "pneumothorax"
                            else f"There are {size} {where} {word}.",
                            f"{_cap(size)} {where} apical {word} with a visible pleural edge."])
            fs.append(_Sentence(s, ("Pneumothorax",), 1.0))
            imp.append(_Sentence(f"{_cap(size)} {where} {word}.", ("Pneumothorax",), 1.0))
    if prior is not None:
        kinds = {o.kind for o in f.opacities}
        for p in prior.opacities:
            if p.kind == "consolidation" and "consolidation" not in kinds and rng.random() < 0.6:
                fs.append(_Sentence(f"Previously seen {p.location} consolidation has resolved.",
                                    ("Consolidation",), 0.0))
                kinds.add("consolidation")
        if prior.effusions and not f.effusions and rng.random() < 0.6:
            fs.append(_Sentence("The previously seen pleural effusion has resolved.", ("Pleural Effusion",), 0.0))
    # Pertinent negatives, only for what is absent.
    kinds = {o.kind for o in f.opacities}
    neg = []
    if not kinds & {"consolidation"} and not (prior and prior.opacities):
        neg.append(_pick(rng, ["focal consolidation", "consolidation"]))
    if not f.effusions:
        neg.append("pleural effusion")
    if not f.pneumothoraces:
        neg.append("pneumothorax")
    if not f.edema and rng.random() < 0.5:
        neg.append("pulmonary edema")
    neg = [n for n in neg if rng.random() < 0.85]
    if neg and not (f.opacities or f.edema or f.pneumothoraces or f.effusions) and rng.random() < 0.5:
        fs.append(_Sentence("The lungs are clear.", (), None))
    if neg:
        listed = neg[0] if len(neg) == 1 else ", ".join(neg[:-1]) + _pick(rng, [" or ", ", or "]) + neg[-1]
        s = _pick(rng, [f"No {listed}.", f"There is no {listed}.", f"No evidence of {listed}."])
        fs.append(_Sentence(s, _labels_in(s), 0.0))
    # Heart and mediastinum.
    if f.cardiomegaly:
        before = prior.cardiomegaly if prior is not None else None
        chg = _change(rng, f.cardiomegaly, before)
        if f.cardiomegaly == 1 and rng.random() < 0.35:
            s = "Heart size is borderline, possibly mild cardiomegaly."
            fs.append(_Sentence(s, ("Cardiomegaly",), -1.0))
        else:
            s = _pick(rng, [f"{_cap(SEV_WORDS[f.cardiomegaly])} cardiomegaly{chg}.",
                            f"The heart is {SEV_ADVERBS[f.cardiomegaly]} enlarged{chg}."])
            fs.append(_Sentence(s, ("Cardiomegaly",), 1.0))
            if f.cardiomegaly >= 2 or rng.random() < 0.5:
                imp.append(_Sentence(f"{_cap(SEV_WORDS[f.cardiomegaly])} cardiomegaly.", ("Cardiomegaly",), 1.0))
        if f.cardiomegaly >= 2 and rng.random() < 0.5:
            fs.append(_Sentence("The cardiomediastinal silhouette is enlarged.",
                                ("Enlarged Cardiomediastinum",), 1.0))
    else:
        s = _pick(rng, ["Heart size is normal.", "The cardiomediastinal silhouette is normal.",
                        "Heart size is normal. Mediastinal contours are normal.",
                        "Normal heart size."])
        for part in split_sentences(s):
            fs.append(_Sentence(part, _labels_in(part), 0.0))
    if rng.random() < 0.3:
        s = _pick(rng, ["No displaced rib fractures.", "No acute osseous abnormality.",
                        "Osseous structures are intact."])
        fs.append(_Sentence(s, _labels_in(s), 0.0 if _labels_in(s) else None))
    for _shape in f.foreign_objects:
        where = _pick(rng, ["left lower chest", "right upper chest", "left mid chest", "right hemithorax"])
        fs.append(_Sentence(f"A radiopaque {_pick(rng, ['foreign body', 'object', 'button'])} "
                            f"projects over the {where}.", (), None))
    fs = devices + fs if devices_first else fs + devices
    if prior is not None and f == prior and rng.random() < 0.7:
        fs.append(_Sentence("Compared to the prior study there is no significant interval change.", (), None))
    if not imp:
        if f.is_normal:
            imp.append(_Sentence(_pick(rng, ["No acute cardiopulmonary process.",
                                             "No acute intrathoracic abnormality.",
                                             "No acute cardiopulmonary abnormality."]), (), None))
        else:
            imp.append(next((s for s in fs if s.value == 1.0 and "Support Devices" not in s.labels),
                            fs[0]))
    if f.devices and rng.random() < 0.5:
        imp.append(_Sentence("Support devices as described.", (), None))
    return fs, imp


# --------------------------------------------------------------------------- layout
_INDICATIONS = [
    "___M with cough and fever  // eval for pneumonia",
    "___F with shortness of breath  // eval for acute process",
    "___-year-old man with chest pain.",
    "___-year-old woman with dyspnea and leg swelling  // ? CHF",
    "___M s/p intubation  // ETT placement",
    "___F with hypoxia  // eval for effusion",
    "History of ___ with new onset ascites  // eval for infection",
    "___M with fall  // r/o fracture",
]


def _para(sentences: list[str], width: int) -> list[str]:
    """Wrap sentences (two spaces between, as MIMIC does) into lines each starting with one space."""
    text = "  ".join(sentences)
    return [" " + line for line in textwrap.wrap(text, width=width, break_on_hyphens=False)]


def make_report(findings: Findings, rng: np.random.Generator, *, exam: str = "CHEST (PA AND LAT)",
                prior: Findings | None = None, layout: str | None = None) -> Report:
    """A full report for ``findings``; ``prior`` (the same subject's previous study) adds comparison
    wording. ``layout``: None (random, MIMIC-like mix), "standard", "combined" (FINDINGS AND
    IMPRESSION), "conclusion", "no_findings", "empty_findings", "empty_impression" or "empty"."""
    fs, imp = _sentences(findings, rng, prior)
    if layout is None:
        r = rng.random()
        layout = ("standard" if r < 0.78 else "combined" if r < 0.84 else "conclusion" if r < 0.90
                  else "no_findings" if r < 0.94 else "empty_findings" if r < 0.96
                  else "empty_impression" if r < 0.985 else "empty")
    width = int(rng.integers(66, 80))
    lines = [" " * 33 + "FINAL REPORT", f" EXAMINATION:  {exam}", " "]
    sections = {"preamble": "FINAL REPORT", "examination": exam}
    ind = _pick(rng, _INDICATIONS)
    lines += [f" INDICATION:  {ind}", " "]
    sections["indication"] = " ".join(ind.split())
    if rng.random() < 0.4:
        tech = _pick(rng, ["Chest PA and lateral", "Portable AP chest radiograph", "Frontal and lateral views"])
        lines += [f" TECHNIQUE:  {tech}", " "]
        sections["technique"] = tech
    comp = "___." if prior is not None else _pick(rng, ["None.", "None available.", "___."])
    lines += [f" COMPARISON:  {comp}", " "]
    sections["comparison"] = comp

    used: list[_Sentence] = []

    def add(header: str, name: str, sents: list[_Sentence]):
        lines.append(f" {header}: ")
        lines.append(" ")
        if sents:
            lines.extend(_para([s.text for s in sents], width))
            lines.append(" ")
        text = " ".join(" ".join(s.text.split()) for s in sents)
        sections[name] = f"{sections[name]} {text}".strip() if sections.get(name) else text
        used.extend(sents)

    if layout == "combined":
        add("FINDINGS AND IMPRESSION", "impression", fs + imp)
    elif layout == "conclusion":
        add("FINDINGS", "findings", fs)
        add("CONCLUSION", "impression", imp)
    elif layout == "no_findings":
        add("IMPRESSION", "impression", fs + imp)
    elif layout == "empty_findings":
        add("FINDINGS", "findings", [])
        add("IMPRESSION", "impression", imp)
    elif layout == "empty_impression":
        add("FINDINGS", "findings", fs)
        add("IMPRESSION", "impression", [])
    elif layout == "empty":
        add("FINDINGS", "findings", [])
        add("IMPRESSION", "impression", [])
    elif layout == "standard":
        add("FINDINGS", "findings", fs)
        add("IMPRESSION", "impression", imp)
    else:
        raise ValueError(f"unknown report layout {layout!r}")
    text = "\n".join(lines).rstrip() + "\n"

    found: dict[str, set[float]] = {}
    for s in used:
        for name in s.labels:
            found.setdefault(name, set()).add(s.value)
    return Report(text, sections, _aggregate(found, bool(used)))
