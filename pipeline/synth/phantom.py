"""Procedural chest X-ray phantoms with findings whose geometry is known exactly.

Everything is drawn on a normalised anatomical frame (u to the image right, v downwards, one unit =
half the shorter image side) that is rotated, shifted and scaled per image, so masks and boxes come
from the same coordinate grids the pixels do. Images are display-oriented like MIMIC-CXR-JPG: air is
dark, bone and soft tissue bright, the patient's right on the image left of a frontal view.

Densities are composited in [0, 1] and mapped to uint8 with per-image exposure, contrast, gamma and
noise. Findings are deliberately strong enough for a ResNet at 224-256 px to learn them, and their
size/density grows with severity so that severity words in the reports are visible too.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

# Anatomical locations of a focal opacity: (side, position along the lung height 0=apex..1=base,
# lateral fraction -1=medial..1=lateral). Side "R" is the patient's right (image left).
LOBES: dict[str, tuple[str, float, float]] = {
    "right upper lobe": ("R", 0.28, 0.15),
    "right middle lobe": ("R", 0.62, -0.35),
    "right lower lobe": ("R", 0.80, 0.25),
    "left upper lobe": ("L", 0.28, 0.15),
    "lingula": ("L", 0.60, -0.25),
    "left lower lobe": ("L", 0.80, 0.30),
}
OPACITY_KINDS = ("consolidation", "atelectasis", "nodule", "ground-glass")
DEVICES = ("endotracheal tube", "enteric tube", "right PICC", "pacemaker")
SHAPES = ("rectangle", "ellipse", "polygon")
FRONTAL_VIEWS = ("PA", "AP", "AP AXIAL", "PA LLD", "LAO", "RAO")
LATERAL_VIEWS = ("LATERAL", "LL")
SEVERITY_WORDS = {1: "mild", 2: "moderate", 3: "severe"}


@dataclasses.dataclass(frozen=True)
class Opacity:
    """A focal lung finding: ``kind`` in OPACITY_KINDS, ``location`` a key of LOBES, severity 1..3."""

    kind: str
    location: str
    severity: int = 2

    def __post_init__(self):
        if self.kind not in OPACITY_KINDS:
            raise ValueError(f"unknown opacity kind {self.kind!r}; expected one of {OPACITY_KINDS}")
        if self.location not in LOBES:
            raise ValueError(f"unknown location {self.location!r}; expected one of {tuple(LOBES)}")
        if self.severity not in (1, 2, 3):
            raise ValueError(f"severity must be 1, 2 or 3, not {self.severity!r}")

    @property
    def side(self) -> str:
        return LOBES[self.location][0]


@dataclasses.dataclass(frozen=True)
class Sided:
    """A one-sided finding (effusion, pneumothorax): side "R"/"L" (patient's), severity 1..3."""

    side: str
    severity: int = 2

    def __post_init__(self):
        if self.side not in ("R", "L"):
            raise ValueError(f"side must be 'R' or 'L', not {self.side!r}")
        if self.severity not in (1, 2, 3):
            raise ValueError(f"severity must be 1, 2 or 3, not {self.severity!r}")


@dataclasses.dataclass(frozen=True)
class Findings:
    """What a study shows. Everything is optional; the default is a normal chest.

    ``cardiomegaly``/``edema``: 0 (absent) to 3 (severe). ``foreign_objects``: shape kinds of
    radiopaque objects (buttons, coins, jewellery) drawn at random places over the chest.
    """

    opacities: tuple[Opacity, ...] = ()
    cardiomegaly: int = 0
    effusions: tuple[Sided, ...] = ()
    pneumothoraces: tuple[Sided, ...] = ()
    edema: int = 0
    devices: tuple[str, ...] = ()
    foreign_objects: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("cardiomegaly", "edema"):
            if getattr(self, name) not in (0, 1, 2, 3):
                raise ValueError(f"{name} must be 0..3, not {getattr(self, name)!r}")
        for d in self.devices:
            if d not in DEVICES:
                raise ValueError(f"unknown device {d!r}; expected one of {DEVICES}")
        for s in self.foreign_objects:
            if s not in SHAPES:
                raise ValueError(f"unknown foreign object shape {s!r}; expected one of {SHAPES}")

    @property
    def is_normal(self) -> bool:
        return not (self.opacities or self.cardiomegaly or self.effusions or self.pneumothoraces
                    or self.edema)


@dataclasses.dataclass
class Region:
    """One finding's footprint in pixels.

    ``finding``: "opacity", "effusion", "pneumothorax", "foreign_object", "device" or "heart".
    ``kind``: opacity kind, device name or foreign-object shape. ``box``: (x1, y1, x2, y2) with
    x2/y2 exclusive (width = x2 - x1), the tight box of ``mask`` (bool HxW). ``points``: a
    foreign object's outline in pixels (rectangle/ellipse: the two corners; polygon: vertices).
    """

    finding: str
    kind: str
    label: str
    box: tuple[int, int, int, int]
    mask: np.ndarray
    points: tuple[tuple[int, int], ...] = ()


@dataclasses.dataclass
class Geometry:
    """All regions of one rendered image plus the cardiothoracic ratio it was drawn with."""

    size: tuple[int, int]  # (height, width)
    view: str
    regions: list[Region]
    ctr: float

    def select(self, finding: str, kind: str | None = None) -> list[Region]:
        return [r for r in self.regions if r.finding == finding and (kind is None or r.kind == kind)]

    def boxes(self, finding: str, kind: str | None = None) -> list[tuple[int, int, int, int]]:
        return [r.box for r in self.select(finding, kind)]

    def mask(self, finding: str, kind: str | None = None) -> np.ndarray:
        """Union of the masks of ``finding`` (all False when absent)."""
        out = np.zeros(self.size, dtype=bool)
        for r in self.select(finding, kind):
            out |= r.mask
        return out


def is_lateral(view: str) -> bool:
    return view in LATERAL_VIEWS


# --------------------------------------------------------------------------- sampling
def sample_findings(rng: np.random.Generator, abnormal: float = 0.65) -> Findings:
    """Random findings with roughly MIMIC-like co-occurrence; ``abnormal`` = P(any finding)."""
    if rng.random() >= abnormal:
        devices = tuple(d for d in DEVICES if rng.random() < 0.04)
        return Findings(devices=devices, foreign_objects=_sample_objects(rng, 0.06))
    while True:
        opac: list[Opacity] = []
        if rng.random() < 0.35:
            for loc in rng.choice(list(LOBES), size=rng.integers(1, 3), replace=False):
                opac.append(Opacity("consolidation", str(loc), int(rng.integers(1, 4))))
        if rng.random() < 0.25:
            base = ["right lower lobe", "left lower lobe"]
            for loc in base if rng.random() < 0.4 else [base[rng.integers(2)]]:
                opac.append(Opacity("atelectasis", loc, int(rng.integers(1, 4))))
        if rng.random() < 0.06:
            opac.append(Opacity("nodule", str(rng.choice(list(LOBES))), int(rng.integers(1, 4))))
        cardio = int(rng.integers(1, 4)) if rng.random() < 0.25 else 0
        eff = tuple(Sided(s, int(rng.integers(1, 4))) for s in _sides(rng, 0.25))
        ptx = tuple(Sided(s, int(rng.integers(1, 4))) for s in _sides(rng, 0.10, both=0.1))
        edema = int(rng.integers(1, 4)) if rng.random() < 0.15 else 0
        devices = tuple(d for d in DEVICES if rng.random() < 0.12)
        f = Findings(tuple(_dedupe(opac)), cardio, eff, ptx, edema, devices, _sample_objects(rng, 0.06))
        if not f.is_normal:
            return f


def _sides(rng: np.random.Generator, p: float, both: float = 0.35) -> list[str]:
    if rng.random() >= p:
        return []
    if rng.random() < both:
        return ["R", "L"]
    return ["R" if rng.random() < 0.5 else "L"]


def _sample_objects(rng: np.random.Generator, p: float) -> tuple[str, ...]:
    if rng.random() >= p:
        return ()
    return tuple(str(s) for s in rng.choice(SHAPES, size=rng.integers(1, 3)))


def _dedupe(opac: list[Opacity]) -> list[Opacity]:
    seen, out = set(), []
    for o in opac:
        if (o.kind, o.location) not in seen:
            seen.add((o.kind, o.location))
            out.append(o)
    return out


# --------------------------------------------------------------------------- drawing helpers
def _soft(x: np.ndarray, eps: float) -> np.ndarray:
    """A 0..1 ramp of width ``eps`` around x = 0 (anti-aliased inside test for x > 0)."""
    return np.clip(x / eps + 0.5, 0.0, 1.0)


def _over(d: np.ndarray, alpha: np.ndarray, value: float) -> np.ndarray:
    """Paint ``value`` over density ``d`` with coverage ``alpha`` (in place)."""
    d += alpha * (value - d)
    return d


def _seg_dist(u: np.ndarray, v: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Distance from each (u, v) to a polyline."""
    best = np.full(u.shape, np.inf, dtype=np.float32)
    for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:]):
        dx, dy = bx - ax, by - ay
        t = np.clip(((u - ax) * dx + (v - ay) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
        np.minimum(best, np.hypot(u - ax - t * dx, v - ay - t * dy), out=best)
    return best


def _noise_field(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth noise in roughly [-1, 1]: a coarse random grid upsampled bilinearly."""
    h, w = shape
    ch, cw = max(2, round(cells * h / max(h, w))), max(2, round(cells * w / max(h, w)))
    coarse = rng.standard_normal((ch, cw)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR))


def _box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# --------------------------------------------------------------------------- the renderer
class _Frame:
    """Pixel grid mapped to the anatomical frame of one image (pose + per-patient anatomy)."""

    def __init__(self, rng: np.random.Generator, size: tuple[int, int]):
        h, w = size
        self.h, self.w = h, w
        half = min(h, w) / 2.0
        self.px = 1.0 / half  # one pixel in frame units
        ang = rng.normal(0.0, 0.035)
        scale = rng.uniform(0.92, 1.06)
        tx, ty = rng.normal(0.0, 0.04), rng.normal(0.02, 0.04)
        ys = ((np.arange(h, dtype=np.float32) + 0.5) - h / 2.0) / half
        xs = ((np.arange(w, dtype=np.float32) + 0.5) - w / 2.0) / half
        xs, ys = xs[None, :] - tx, ys[:, None] - ty
        c, s = math.cos(ang), math.sin(ang)
        self.u = ((c * xs + s * ys) / scale).astype(np.float32)
        self.v = ((-s * xs + c * ys) / scale).astype(np.float32)
        self.px /= scale
        self.pose = (ang, scale, tx, ty)

    def to_pixels(self, pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
        ang, scale, tx, ty = self.pose
        c, s = math.cos(ang), math.sin(ang)
        half = min(self.h, self.w) / 2.0
        out = []
        for u, v in pts:
            xs, ys = c * u * scale - s * v * scale + tx, s * u * scale + c * v * scale + ty
            out.append((xs * half + self.w / 2.0 - 0.5, ys * half + self.h / 2.0 - 0.5))
        return out


def render(findings: Findings, rng: np.random.Generator, size: int | tuple[int, int] = 256,
           view: str = "PA") -> tuple[np.ndarray, Geometry]:
    """Draw one radiograph of ``findings`` seen from ``view``.

    Returns a uint8 (H, W) image and its ``Geometry``; fully determined by the state of ``rng``.
    ``size`` is an int (square) or (height, width).
    """
    h, w = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if h < 32 or w < 32:
        raise ValueError(f"image size must be at least 32 px, got {h}x{w}")
    fr = _Frame(rng, (h, w))
    if is_lateral(view):
        d, regions, ctr = _lateral(fr, findings, rng)
    else:
        d, regions, ctr = _frontal(fr, findings, rng, ap=view.startswith("AP"))
    regions += _draw_foreign(fr, d, findings.foreign_objects, rng)
    img = _expose(d, rng, view)
    return img, Geometry((h, w), view, regions, ctr)


def _expose(d: np.ndarray, rng: np.random.Generator, view: str) -> np.ndarray:
    contrast = rng.uniform(0.85, 1.15) * (0.92 if view.startswith("AP") else 1.0)
    bright = rng.uniform(-0.06, 0.06)
    gamma = rng.uniform(0.8, 1.2)
    x = np.clip(d * contrast + bright, 0.0, 1.0) ** gamma
    x = x * 255.0 + rng.normal(0.0, rng.uniform(1.5, 5.0), size=d.shape).astype(np.float32)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def _lung_params(rng: np.random.Generator, ap: bool) -> dict:
    ws = rng.uniform(0.94, 1.04)
    lift = 0.05 if ap else 0.0  # supine portable films are taken at shallower inspiration
    return {
        "R": {"cx": -0.43 * ws, "w": rng.uniform(0.34, 0.37) * ws, "top": rng.uniform(-0.84, -0.76),
              "base": rng.uniform(0.50, 0.58) - lift, "dome": rng.uniform(0.12, 0.18), "sign": -1.0},
        "L": {"cx": 0.44 * ws, "w": rng.uniform(0.33, 0.36) * ws, "top": rng.uniform(-0.82, -0.74),
              "base": rng.uniform(0.56, 0.64) - lift, "dome": rng.uniform(0.10, 0.16), "sign": 1.0},
        "thorax": 0.80 * ws,  # half-width of the rib cage, for the CTR
    }


def _lung_field(u, v, p: dict) -> tuple[np.ndarray, np.ndarray]:
    """(g, t): g > 0 inside the lung (about a unit per lung half-width), t = 0 apex .. 1 base."""
    lat = (u - p["cx"]) * p["sign"]  # positive laterally
    dome = p["base"] - p["dome"] * np.clip(1.0 - (lat / (p["w"] * 1.1)) ** 2, 0.0, 1.0)
    t = (v - p["top"]) / (dome - p["top"])
    w = p["w"] * (0.30 + 0.70 * np.sqrt(np.clip(t, 0.0, 1.0))) + 1e-3
    g = np.minimum(1.0 - np.abs(lat + 0.02) / w, np.minimum(t * 6.0, (1.0 - t) * 12.0))
    return g, t


def _frontal(fr: _Frame, f: Findings, rng: np.random.Generator, ap: bool):
    u, v, px = fr.u, fr.v, fr.px
    eps = 1.5 * px
    lp = _lung_params(rng, ap)
    regions: list[Region] = []

    # Body: soft tissue inside a torso whose width narrows to the neck above the shoulders.
    bw = 0.28 + 0.70 * (1.0 / (1.0 + np.exp(-(v + 0.86) * 10.0)))
    body = _soft(bw * rng.uniform(0.97, 1.03) - np.abs(u), eps)
    d = (0.04 + 0.42 * body).astype(np.float32)
    # Slightly brighter soft tissue towards the abdomen and the shoulders (breast/arm shadow).
    d += 0.05 * body * np.clip(np.abs(u) - 0.72, 0, 1) * 4

    # Lungs (dark) with vascular markings fading to the periphery.
    markings = _noise_field(rng, (fr.h, fr.w), 28)
    lungs, field = {}, {}
    for side in ("R", "L"):
        p = lp[side]
        g, t = _lung_field(u, v, p)
        lungs[side] = _soft(g, 0.03)
        field[side] = (g, t)
    lung = np.maximum(lungs["R"], lungs["L"])
    hx = {s: lp[s]["cx"] - 0.15 * lp[s]["sign"] for s in "RL"}
    hil = np.exp(-(((u - np.where(u < 0, hx["R"], hx["L"])) ** 2) + (v + 0.05) ** 2) / 0.12)
    mark = 0.035 * markings * (0.4 + hil) + 0.05 * hil

    # Pneumothorax: the lung collapses towards its lower medial corner; the rim has no markings.
    ptx_masks = {}
    for pt in f.pneumothoraces:
        p = lp[pt.side]
        s = 1.0 - 0.13 * pt.severity - rng.uniform(0.0, 0.04)
        ox, oy = p["cx"] - 0.20 * p["sign"], p["base"] - 0.05
        gc, _ = _lung_field(ox + (u - ox) / s, oy + (v - oy) / s, p)
        inside = lungs[pt.side]
        rim = inside * (1.0 - _soft(gc, 0.02))
        ptx_masks[pt.side] = (rim > 0.5, gc, rim)
    d = _over(d, lung, 0.13)
    air_markings = lung.copy()
    for rim in (r for _m, _gc, r in ptx_masks.values()):
        air_markings *= 1.0 - rim
    d += mark * air_markings
    for side, (_m, gc, rim) in ptx_masks.items():
        d = _over(d, rim, 0.045)
        # The visible pleural edge runs where the collapsed lung has pulled away from the wall, not
        # along the medial border that both outlines share.
        line = np.exp(-(gc / (0.9 * px * 6.0)) ** 2) * _soft(field[side][0] - 0.10, 0.05)
        d += 0.22 * line
        d += 0.03 * _soft(gc, 0.02) * lungs[side]  # the collapsed lung is a bit denser

    # Ribs (posterior arcs) and clavicles.
    au = np.abs(u)
    phase = (v + 0.55 * (au - 0.15) ** 2 - 0.3 * au) / rng.uniform(0.125, 0.14)
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * phase)) ** 6
    cage = _soft(0.90 - au, 0.04) * _soft(v + 0.90, 0.05) * _soft(0.70 - v, 0.08)
    d += 0.10 * ribs * cage
    cy = rng.uniform(-0.80, -0.72) - (0.04 if ap else 0.0)
    clav = np.exp(-((v - (cy - 0.12 * (au - 0.1) + 0.25 * (au - 0.35) ** 2)) / 0.028) ** 2)
    d += 0.16 * clav * _soft(0.70 - au, 0.04) * _soft(au - 0.06, 0.03)

    # Spine and trachea behind the mediastinum.
    d += 0.06 * _soft(0.07 - au, eps) * (0.7 + 0.3 * np.cos(v * 38.0))
    medw = 0.11 * (1.12 if ap else 1.0) * rng.uniform(0.92, 1.08)
    knob = 0.05 * np.exp(-(((u - 0.12) / 0.06) ** 2 + ((v + 0.38) / 0.07) ** 2))
    mediast = _soft(medw + knob - np.abs(u - 0.01), eps) * _soft(0.4 - v, 0.1) * _soft(v + 1.2, 0.05)
    d = _over(d, mediast, 0.58)
    trach = _soft(0.032 - np.abs(u), eps) * _soft(-0.32 - v, 0.04)
    d -= 0.12 * trach

    # Heart: an ellipse whose half-width sets the cardiothoracic ratio.
    ctr = rng.uniform(0.40, 0.49) + [0.0, 0.09, 0.15, 0.22][f.cardiomegaly] + (0.03 if ap else 0.0)
    hw = ctr * lp["thorax"]
    hcx, hcy = 0.33 * hw, lp["R"]["base"] - 0.08
    ry = 0.70 * hw + 0.04
    heart = _soft(1.0 - ((u - hcx) / hw) ** 2 - ((v - hcy) / ry) ** 2, 0.05)
    d = _over(d, heart, 0.60)
    hmask = heart > 0.5
    # The pneumothorax region is what stays visible: the mediastinum and heart cover the rest.
    for side, (m, _, _) in ptx_masks.items():
        m = m & (mediast < 0.5) & ~hmask
        if (box := _box(m)) is not None:
            regions.append(Region("pneumothorax", side, f"{_side_word(side)} pneumothorax", box, m))
    hb = _box(hmask)
    if hb is not None:
        regions.append(Region("heart", "heart", "cardiac silhouette", hb, hmask))

    # Diaphragm and abdomen below the domes; a gastric bubble under the left dome.
    for side in ("R", "L"):
        p = lp[side]
        lat = (u - p["cx"]) * p["sign"]
        dome = p["base"] - p["dome"] * np.clip(1.0 - (lat / (p["w"] * 1.1)) ** 2, 0.0, 1.0)
        half = _soft(u * p["sign"] + 0.02, eps)
        d = _over(d, half * _soft(v - dome, eps * 2) * body, 0.62)
    bub = _soft(1.0 - ((u - lp["L"]["cx"] - 0.02) / 0.09) ** 2 - ((v - lp["L"]["base"] - 0.10) / 0.05) ** 2,
                0.2)
    d = _over(d, bub * _soft(v - lp["L"]["base"] - 0.09, eps), 0.25)

    # Edema: bilateral perihilar haze, denser with severity.
    if f.edema:
        haze = np.exp(-(((np.abs(u) - 0.25) / 0.22) ** 2 + ((v - 0.05) / 0.35) ** 2))
        d = _over(d, lung * haze * (0.15 + 0.13 * f.edema), 0.48)

    # Focal opacities within their lobe.
    for o in f.opacities:
        regions.append(_draw_opacity(fr, d, o, lp, field, lungs, rng))

    # Effusion: dependent fluid with a meniscus rising laterally; blunts the costophrenic angle.
    for e in f.effusions:
        p = lp[e.side]
        g, t = field[e.side]
        lat = (u - p["cx"]) * p["sign"] / p["w"]
        level = 1.0 - (0.08 + 0.11 * e.severity) + 0.01 * rng.standard_normal() - 0.22 * np.clip(lat, 0, 2) ** 2
        fluid = _soft(t - level, 0.02) * _soft(g + 0.15, 0.03) * _soft(1.05 - t, 0.02)
        d = _over(d, fluid, 0.56)
        m = (fluid > 0.5) & (g > -0.1)
        b = _box(m)
        if b is not None:
            regions.append(Region("effusion", e.side, f"{_side_word(e.side)} pleural effusion", b, m))

    for dev in f.devices:
        regions.append(_draw_device(fr, d, dev, lp, rng))
    return d, regions, float(ctr)


def _side_word(side: str) -> str:
    return "right" if side == "R" else "left"


def _draw_opacity(fr: _Frame, d: np.ndarray, o: Opacity, lp: dict, field: dict, lungs: dict,
                  rng: np.random.Generator) -> Region:
    u, v = fr.u, fr.v
    side, tpos, lpos = LOBES[o.location]
    p = lp[side]
    g, t = field[side]
    # Centre in frame units from the lobe's (height, laterality) position within the lung.
    cy = p["top"] + tpos * (p["base"] - 0.06 - p["top"])
    wid = p["w"] * (0.30 + 0.70 * math.sqrt(tpos))
    cx = p["cx"] + p["sign"] * lpos * wid * 0.6
    cx += rng.normal(0, 0.02)
    cy += rng.normal(0, 0.02)
    sev = o.severity
    if o.kind == "nodule":
        r = 0.025 + 0.012 * sev
        a = _soft(1.0 - np.hypot(u - cx, v - cy) / r, 0.08)
        val, alpha = 0.62, 0.95
    elif o.kind == "atelectasis":
        # Plate-like band in the lower zone, longer and thicker with severity.
        length, thick = 0.12 + 0.05 * sev, 0.020 + 0.010 * sev
        tilt = rng.normal(0, 0.15)
        du, dv = u - cx, v - cy
        along, across = du * math.cos(tilt) + dv * math.sin(tilt), -du * math.sin(tilt) + dv * math.cos(tilt)
        a = _soft(1.0 - (along / length) ** 2 - (across / thick) ** 2, 0.3)
        val, alpha = 0.58, 0.9
    else:
        r = (0.06 + 0.045 * sev) * (1.25 if o.kind == "ground-glass" else 1.0)
        blob = np.zeros_like(u)
        nb = 6 if o.kind == "ground-glass" else 3
        for _ in range(nb):
            bx, by = cx + rng.normal(0, r * 0.45), cy + rng.normal(0, r * 0.45)
            br = r * rng.uniform(0.55, 0.85)
            blob += np.exp(-((u - bx) ** 2 + (v - by) ** 2) / (br * br))
        a = _soft(blob - 0.55, 0.35)
        if o.kind == "ground-glass":
            val, alpha = 0.40, 0.35 + 0.08 * sev
        else:
            val, alpha = 0.55, 0.55 + 0.12 * sev
    a = a * _soft(g + 0.02, 0.04)  # stays within the lung (the pleura bounds it)
    _over(d, a * alpha, val)
    m = a > 0.5
    box = _box(m) or (0, 0, 1, 1)
    sevword = SEVERITY_WORDS[sev]
    return Region("opacity", o.kind, f"{sevword} {o.kind} {o.location}", box, m)


def _draw_device(fr: _Frame, d: np.ndarray, dev: str, lp: dict, rng: np.random.Generator) -> Region:
    u, v, px = fr.u, fr.v, fr.px
    j = lambda s=0.02: rng.normal(0, s)  # noqa: E731 - small anatomical jitter
    if dev == "endotracheal tube":
        pts = [(j(0.005), -1.6), (j(0.008), -0.50 + j(0.04))]
        width, val = 0.016, 0.30
    elif dev == "enteric tube":
        pts = [(-0.02 + j(0.005), -1.6), (0.0 + j(0.01), -0.2), (0.06, 0.35),
               (lp["L"]["cx"] - 0.05 + j(), lp["L"]["base"] + 0.14 + j(0.01)),
               (lp["L"]["cx"] + 0.06 + j(), lp["L"]["base"] + 0.10 + j(0.01))]
        width, val = 0.010, 0.28
    elif dev == "right PICC":
        pts = [(-1.3, -0.55 + j()), (-0.62 + j(), -0.68 + j()), (-0.18, -0.55 + j()),
               (-0.05 + j(0.01), -0.12 + j(0.05))]
        width, val = 0.008, 0.26
    else:  # pacemaker: generator in the left upper chest, leads to the right heart
        gx, gy = 0.52 + j(0.03), -0.70 + j(0.03)
        can = _soft(1.0 - (np.abs(u - gx) / 0.085) ** 4 - (np.abs(v - gy) / 0.06) ** 4, 0.1)
        _over(d, can, 0.97)
        pts = [(gx - 0.06, gy + 0.02), (0.12, -0.50), (0.0, -0.2), (-0.08, 0.18 + j())]
        width, val = 0.009, 0.35
    dist = _seg_dist(u, v, pts)
    line = _soft(width - dist, max(px, 0.004))
    d += val * line
    m = line > 0.5
    if dev == "pacemaker":
        m |= can > 0.5
    return Region("device", dev, dev, _box(m) or (0, 0, 1, 1), m)


def _draw_foreign(fr: _Frame, d: np.ndarray, shapes: tuple[str, ...], rng: np.random.Generator
                  ) -> list[Region]:
    """Radiopaque objects drawn axis-aligned in pixel space, where object-CXR annotates them."""
    h, w = fr.h, fr.w
    regions = []
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
    for shape in shapes:
        side = min(h, w)
        bw, bh = (max(8, int(side * rng.uniform(0.035, 0.10))) for _ in range(2))
        x1 = int(rng.integers(int(0.12 * w), max(int(0.88 * w) - bw, int(0.12 * w) + 1)))
        y1 = int(rng.integers(int(0.10 * h), max(int(0.85 * h) - bh, int(0.10 * h) + 1)))
        x2, y2 = x1 + bw, y1 + bh
        if shape == "rectangle":
            m = (xx >= x1) & (xx < x2) & (yy >= y1) & (yy < y2)
            pts = ((x1, y1), (x2, y2))
        elif shape == "ellipse":
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
            pts = ((x1, y1), (x2, y2))
        else:
            n = int(rng.integers(3, 8))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            rad = rng.uniform(0.5, 1.0, n)
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            pts = tuple((int(round(cx + rx * r * math.cos(a))), int(round(cy + ry * r * math.sin(a))))
                        for a, r in zip(ang, rad))
            m = polygon_mask(pts, h, w)
        if not m.any():
            continue
        _over(d, m.astype(np.float32), rng.uniform(0.9, 1.0))
        regions.append(Region("foreign_object", shape, f"radiopaque {shape}", _box(m), m, pts))
    return regions


def polygon_mask(points, height: int, width: int) -> np.ndarray:
    """Boolean mask of pixels whose centres lie inside the polygon (even-odd rule)."""
    pts = np.asarray(points, dtype=np.float64)
    x0, y0 = np.floor(pts.min(axis=0)).astype(int)
    x1, y1 = np.ceil(pts.max(axis=0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    out = np.zeros((height, width), dtype=bool)
    if x1 <= x0 or y1 <= y0:
        return out
    ys = np.arange(y0, y1)[:, None] + 0.5
    xs = np.arange(x0, x1)[None, :] + 0.5
    inside = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for (ax, ay), (bx, by) in zip(pts, np.roll(pts, -1, axis=0)):
        if ay == by:
            continue
        crosses = (ay > ys) != (by > ys)
        xint = ax + (ys - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (xs < xint)
    out[y0:y1, x0:x1] = inside
    return out


def _lateral(fr: _Frame, f: Findings, rng: np.random.Generator):
    """A lateral view: anterior to the image left, spine on the right, one overlapped lung field."""
    u, v, px = fr.u, fr.v, fr.px
    eps = 1.5 * px
    regions: list[Region] = []
    trunk = _soft(1.0 - (u / 0.86) ** 2 - ((v - 0.1) / 1.25) ** 2, 0.05)
    neck = _soft(0.25 - np.abs(u - 0.1), eps) * _soft(-0.7 - v, 0.05)
    body = np.clip(trunk + neck, 0, 1)
    d = (0.04 + 0.44 * body).astype(np.float32)
    top, base = rng.uniform(-0.80, -0.70), rng.uniform(0.42, 0.52)
    p = {"cx": 0.02, "w": 0.52, "top": top, "base": base, "dome": 0.10, "sign": 1.0}
    # Both lungs overlap into one field, symmetric about its centre line.
    g, t = _lung_field(0.02 + np.abs(u - 0.02) * 1.0, v, p)
    lung = _soft(g, 0.03)
    d = _over(d, lung, 0.16)
    d += 0.03 * _noise_field(rng, (fr.h, fr.w), 24) * lung
    # Spine (posterior) with vertebral bodies, sternum (anterior).
    sp = _soft(0.10 - np.abs(u - 0.62), eps) * _soft(v + 1.0, 0.05)
    d = _over(d, sp * (0.75 + 0.25 * (np.cos(v * 30.0) > -0.6)), 0.62)
    d += 0.10 * _soft(0.018 - np.abs(u + 0.62 + 0.05 * v), eps) * _soft(0.2 - np.abs(v + 0.25), 0.02)
    # Heart anterior and inferior; bigger with cardiomegaly.
    ctr = rng.uniform(0.40, 0.49) + [0.0, 0.09, 0.15, 0.22][f.cardiomegaly]
    hr = 0.26 + 0.55 * (ctr - 0.45)
    heart = _soft(1.0 - ((u + 0.18) / hr) ** 2 - ((v - base + 0.25) / (hr * 1.05)) ** 2, 0.05)
    d = _over(d, heart, 0.55)
    hmask = heart > 0.5
    if (hb := _box(hmask)) is not None:
        regions.append(Region("heart", "heart", "cardiac silhouette", hb, hmask))
    d = _over(d, _soft(v - base - 0.05 * u, eps * 2) * body, 0.62)
    if f.edema:
        haze = np.exp(-((u / 0.3) ** 2 + ((v - 0.05) / 0.3) ** 2))
        d = _over(d, lung * haze * (0.15 + 0.12 * f.edema), 0.48)
    for o in f.opacities:
        _, tpos, lpos = LOBES[o.location]
        # Lower lobes lie posterior (image right), the middle lobe and lingula anterior.
        cx = {0.28: 0.05, 0.62: -0.25, 0.60: -0.22, 0.80: 0.28}.get(tpos, 0.0) + rng.normal(0, 0.02)
        cy = top + tpos * (base - top) + rng.normal(0, 0.02)
        r = (0.05 + 0.035 * o.severity) * (0.5 if o.kind in ("nodule", "atelectasis") else 1.0)
        a = _soft(1.0 - np.hypot(u - cx, (v - cy) * (2.0 if o.kind == "atelectasis" else 1.0)) / r, 0.2)
        a *= _soft(g + 0.02, 0.04)
        alpha = 0.4 if o.kind == "ground-glass" else 0.55 + 0.1 * o.severity
        _over(d, a * alpha, 0.55)
        m = a > 0.5
        regions.append(Region("opacity", o.kind, f"{SEVERITY_WORDS[o.severity]} {o.kind} {o.location}",
                              _box(m) or (0, 0, 1, 1), m))
    if f.effusions:
        sev = max(e.severity for e in f.effusions)
        level = 1.0 - (0.10 + 0.12 * sev) - 0.25 * np.clip(u - 0.1, 0, 1)
        fluid = _soft(t - level, 0.02) * _soft(g + 0.15, 0.03) * _soft(u + 0.1, 0.05)
        d = _over(d, fluid, 0.56)
        m = (fluid > 0.5) & (g > -0.1)
        if (b := _box(m)) is not None:
            side = "B" if len(f.effusions) > 1 else f.effusions[0].side
            regions.append(Region("effusion", side, "pleural effusion", b, m))
    if f.pneumothoraces:
        sev = max(pt.severity for pt in f.pneumothoraces)
        rim = lung * _soft(0.08 + 0.05 * sev - (t + 0.02), 0.02) * _soft(0.5 - np.abs(u), 0.02)
        d = _over(d, rim, 0.05)
        m = rim > 0.5
        if (b := _box(m)) is not None:
            regions.append(Region("pneumothorax", "apical", "apical pneumothorax", b, m))
    for dev in f.devices:
        if dev == "pacemaker":
            pts = [(-0.40, -0.72), (-0.2, -0.4), (-0.1, 0.2)]
        else:
            pts = [(0.05, -1.6), (0.02 + rng.normal(0, 0.01), -0.45 if dev == "endotracheal tube" else 0.6)]
        line = _soft(0.010 - _seg_dist(u, v, pts), max(px, 0.004))
        d += 0.28 * line
        m = line > 0.5
        regions.append(Region("device", dev, dev, _box(m) or (0, 0, 1, 1), m))
    return d, regions, float(ctr)
