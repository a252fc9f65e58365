"""Embedded synthetic radiology dataset whose ROCO-style captions are fully determined by the pixels.

    python -m pipelines.synthetic --out data/synthetic          # 16,000 / 1,000 / 1,000 at 256 px

Every image shows one study (modality, body region, view or plane) with at most one finding of a
given size on a given side, drawn in radiological convention (the patient's right on the image's
left). Its caption names exactly those fields in one of several phrasings, so `pipelines.findings`
reads them back. The output has ROCOv2's layout plus `{split}_findings.csv` with the true fields.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

from pipelines.findings import FIELDS

# ----------------------------------------------------------------------------- vocabularies
GENERATOR_VERSION = 1
SPLITS = ("train", "valid", "test")
MODALITIES = ("x-ray", "ct", "mri", "ultrasound")
REGIONS_BY_MODALITY = {
    "x-ray": ("chest", "hand"),
    "ct": ("head", "chest", "abdomen"),
    "mri": ("brain", "knee"),
    "ultrasound": ("abdomen", "thyroid"),
}
_PLANES = ("axial", "coronal", "sagittal")
VIEWS_BY_STUDY = {
    ("x-ray", "chest"): ("pa", "ap"),
    ("x-ray", "hand"): ("pa", "oblique"),
    ("ct", "head"): _PLANES,
    ("ct", "chest"): _PLANES,
    ("ct", "abdomen"): _PLANES,
    ("mri", "brain"): _PLANES,
    ("mri", "knee"): _PLANES,
    ("ultrasound", "abdomen"): ("transverse", "longitudinal"),
    ("ultrasound", "thyroid"): ("transverse", "longitudinal"),
}
FINDINGS_BY_REGION = {
    "chest": ("none", "nodule", "effusion", "pneumothorax"),
    "hand": ("none", "fracture"),
    "head": ("none", "haemorrhage", "infarct"),
    "abdomen": ("none", "cyst", "mass", "stone"),
    "brain": ("none", "mass", "cyst"),
    "knee": ("none", "effusion", "cyst"),
    "thyroid": ("none", "nodule", "cyst"),
}
# Views in which the lesion's side can be seen; elsewhere (sagittal, longitudinal, knee) laterality is None.
LATERALISED_VIEWS = {
    ("x-ray", "chest"): ("pa", "ap"),
    ("x-ray", "hand"): ("pa", "oblique"),
    ("ct", "head"): ("axial", "coronal"),
    ("ct", "chest"): ("axial", "coronal"),
    ("ct", "abdomen"): ("axial", "coronal"),
    ("mri", "brain"): ("axial", "coronal"),
    ("ultrasound", "thyroid"): ("transverse",),
}
LATERALITIES = ("left", "right")
SIZES = ("small", "large")
UNSIZED_FINDINGS = ("none", "fracture")
SIZE_RANGES = {"small": (0.05, 0.065), "large": (0.13, 0.17)}  # lesion diameter / image width
ARROW_PROBABILITY = 0.3
_SPLIT_CODES = {split: code for code, split in enumerate(SPLITS)}
_SIDE = {"right": -1, "left": 1}  # image x direction of the patient's side (radiological convention)


def sample_fields(rng: np.random.Generator) -> dict[str, str | None]:
    """One random, anatomically plausible set of ground-truth fields."""
    modality = _pick(rng, MODALITIES)
    region = _pick(rng, REGIONS_BY_MODALITY[modality])
    view = _pick(rng, VIEWS_BY_STUDY[(modality, region)])
    finding = _pick(rng, FINDINGS_BY_REGION[region])
    return {
        "modality": modality,
        "region": region,
        "view": view,
        "finding": finding,
        "laterality": _pick(rng, LATERALITIES) if _lateralised(modality, region, view, finding) else None,
        "size": None if finding in UNSIZED_FINDINGS else _pick(rng, SIZES),
    }


def iter_field_combinations() -> Iterator[dict[str, str | None]]:
    """Every valid set of fields the generator can draw."""
    for (modality, region), views in VIEWS_BY_STUDY.items():
        for view in views:
            for finding in FINDINGS_BY_REGION[region]:
                for laterality in LATERALITIES if _lateralised(modality, region, view, finding) else (None,):
                    for size in (None,) if finding in UNSIZED_FINDINGS else SIZES:
                        yield dict(zip(FIELDS, (modality, region, view, finding, laterality, size)))


def _lateralised(modality: str, region: str, view: str, finding: str) -> bool:
    return finding != "none" and view in LATERALISED_VIEWS.get((modality, region), ())


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


# ----------------------------------------------------------------------------- captions
_MODALITY_NOUNS = {
    "x-ray": ("X-ray", "radiograph", "plain radiograph", "plain film"),
    "ct": ("CT", "CT scan", "computed tomography", "CT image"),
    "mri": ("MRI", "MR image", "T2-weighted MRI", "magnetic resonance image", "T2-weighted MR image"),
    "ultrasound": ("ultrasound", "ultrasound image", "sonogram", "ultrasonography", "US image"),
}
_VIEW_ADJECTIVES = {
    "pa": ("PA", "posteroanterior"),
    "ap": ("AP", "anteroposterior", "portable AP"),
    "oblique": ("oblique",),
    "axial": ("axial",),
    "coronal": ("coronal",),
    "sagittal": ("sagittal",),
    "transverse": ("transverse",),
    "longitudinal": ("longitudinal", "sagittal"),
}
_VIEW_NOUNS = {"x-ray": ("view", "projection"), "ct": ("image", "plane"), "mri": ("image", "plane"),
               "ultrasound": ("view", "plane")}
_REGION_NOUNS = {
    "chest": ("the chest", "the thorax"), "hand": ("both hands", "the hands"), "head": ("the head",),
    "abdomen": ("the abdomen",), "brain": ("the brain",), "knee": ("the knee",),
    "thyroid": ("the thyroid", "the thyroid gland"),
}
_REGION_ADJECTIVES = {
    "chest": ("chest", "thoracic"), "hand": ("hand",), "head": ("head", "cranial"),
    "abdomen": ("abdominal", "abdomen"), "brain": ("brain",), "knee": ("knee",), "thyroid": ("thyroid",),
}
_FINDING_NOUNS = {
    "nodule": ("nodule", "solid nodule", "well-defined nodule"),
    "mass": ("mass", "tumour", "solid mass", "space-occupying lesion"),
    "cyst": ("cyst", "cystic lesion", "simple cyst"),
    ("chest", "effusion"): ("pleural effusion", "effusion"),
    ("knee", "effusion"): ("joint effusion", "knee effusion"),
    "pneumothorax": ("pneumothorax",),
    "fracture": ("fracture", "angulated fracture", "displaced fracture"),
    "haemorrhage": ("haemorrhage", "hemorrhage", "intraparenchymal haemorrhage", "haematoma", "bleed"),
    "infarct": ("infarct", "infarction", "ischaemic infarct"),
    "stone": ("stone", "calculus"),
}
_DESCRIPTORS = {  # an adjective the image shows, used in half the captions
    ("x-ray", "nodule"): "rounded",
    ("ct", "cyst"): "hypodense", ("ct", "mass"): "heterogeneous", ("ct", "stone"): "hyperdense",
    ("ct", "haemorrhage"): "hyperdense", ("ct", "infarct"): "hypodense",
    ("mri", "cyst"): "T2-hyperintense", ("mri", "mass"): "heterogeneous",
    ("ultrasound", "cyst"): "anechoic", ("ultrasound", "nodule"): "hypoechoic",
    ("ultrasound", "stone"): "echogenic", ("ultrasound", "mass"): "heterogeneous",
}
_SIZE_WORDS = {"small": ("small", "small", "tiny"), "large": ("large", "large", "sizeable")}


@dataclass(frozen=True)
class _Site:
    """Where a finding lies: '{prep} the {side} {noun}' or '{side} {adjective} {finding}'."""

    prep: str
    noun: str
    adjective: str
    paired: bool = False  # the organ exists on both sides, so it is named only with a side


_LUNG = _Site("in", "lung", "lung")
_HEMISPHERE = _Site("in", "hemisphere", "hemispheric", paired=True)
_THYROID_LOBE = _Site("in", "thyroid lobe", "thyroid")
_SITES: dict[tuple[str, str], dict[str, _Site | None]] = {
    ("x-ray", "chest"): {"nodule": _LUNG, "effusion": None, "pneumothorax": None},
    ("ct", "chest"): {"nodule": _LUNG, "effusion": None, "pneumothorax": None},
    ("x-ray", "hand"): {"fracture": _Site("of", "distal radius", "distal radius", paired=True)},
    ("ct", "head"): {"haemorrhage": _HEMISPHERE, "infarct": _HEMISPHERE},
    ("mri", "brain"): {"mass": _HEMISPHERE, "cyst": _HEMISPHERE},
    ("ct", "abdomen"): dict.fromkeys(("cyst", "mass", "stone"), _Site("in", "kidney", "renal")),
    ("ultrasound", "abdomen"): {"cyst": _Site("in", "liver", "hepatic"), "mass": _Site("in", "liver", "hepatic"),
                                "stone": _Site("in", "gallbladder", "gallbladder")},
    ("mri", "knee"): {"effusion": None, "cyst": _Site("in", "popliteal fossa", "popliteal")},
    ("ultrasound", "thyroid"): {"nodule": _THYROID_LOBE, "cyst": _THYROID_LOBE},
}
NORMAL_TEMPLATES = (
    "{study_c}: no acute abnormality.",
    "{study} showing no abnormality.",
    "Normal {study}.",
    "{study} is unremarkable.",
    "Unremarkable {study}.",
    "{study} with normal appearances.",
)
FINDING_TEMPLATES = (
    "{study} showing {np}{arrow}.",
    "{study_c}: {np}{arrow}.",
    "{study} demonstrates {np}{arrow}.",
    "{np_bare} on {study}{arrow}.",
    "{study} revealing {np}{arrow}.",
    "There is {np} on this {study}{arrow}.",
    "{study}. Note {np}{arrow}.",
    "{study_c} with {np}{arrow}.",
)
_ARROWS = (" (arrow)", " (arrow)", " (white arrow)", " (arrowhead)")


def caption_templates(finding: str) -> tuple[str, ...]:
    """The sentence templates a caption with this finding is drawn from."""
    return NORMAL_TEMPLATES if finding == "none" else FINDING_TEMPLATES


def compose_caption(
    fields: Mapping[str, str | None], rng: np.random.Generator, template: int | None = None, arrow: bool = False
) -> str:
    """A ROCO-style caption naming exactly `fields`, in a random (or the given) phrasing."""
    templates = caption_templates(fields["finding"])
    text = templates[int(rng.integers(len(templates))) if template is None else template]
    slots = {"study": _study(fields, rng), "study_c": _study_c(fields, rng), "arrow": ""}
    if fields["finding"] != "none":
        phrase = _finding_phrase(fields, rng)
        slots.update(np=f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}", np_bare=phrase)
        slots["arrow"] = _pick(rng, _ARROWS) if arrow else ""
    text = text.format(**slots)
    return text[0].upper() + text[1:]


def _study(fields: Mapping, rng: np.random.Generator) -> str:
    """'axial CT of the abdomen' or 'axial abdominal CT'."""
    view = _pick(rng, _VIEW_ADJECTIVES[fields["view"]])
    noun = _pick(rng, _MODALITY_NOUNS[fields["modality"]])
    if rng.random() < 0.5:
        return f"{view} {noun} of {_pick(rng, _REGION_NOUNS[fields['region']])}"
    return f"{view} {_pick(rng, _REGION_ADJECTIVES[fields['region']])} {noun}"


def _study_c(fields: Mapping, rng: np.random.Generator) -> str:
    """'chest X-ray, PA view'."""
    region = _pick(rng, _REGION_ADJECTIVES[fields["region"]])
    noun = _pick(rng, _MODALITY_NOUNS[fields["modality"]])
    view = _pick(rng, _VIEW_ADJECTIVES[fields["view"]])
    return f"{region} {noun}, {view} {_pick(rng, _VIEW_NOUNS[fields['modality']])}"


def _finding_phrase(fields: Mapping, rng: np.random.Generator) -> str:
    """'large hypodense cyst in the left kidney' or 'large left renal cyst'."""
    finding, side = fields["finding"], fields["laterality"]
    site = _SITES[(fields["modality"], fields["region"])][finding]
    nouns = _FINDING_NOUNS.get(finding) or _FINDING_NOUNS[(fields["region"], finding)]
    size = _pick(rng, _SIZE_WORDS[fields["size"]]) if fields["size"] else ""
    descriptor = _DESCRIPTORS.get((fields["modality"], finding), "") if rng.random() < 0.5 else ""
    named_site = site is not None and (side is not None or not site.paired)
    if rng.random() < 0.5:
        if site is None:
            where = f"on the {side}" if side else ""
        else:
            where = f"{site.prep} the {side or ''} {site.noun}" if named_site else ""
        words = (size, descriptor, _pick(rng, nouns), where)
    else:
        side_word = f"{side}-sided" if site is None and side else side or ""
        words = (size, descriptor, side_word, site.adjective if named_site else "", _pick(rng, nouns))
    return " ".join(" ".join(words).split())


# ----------------------------------------------------------------------------- drawing
# Tissue labels drawn into the label layers; each modality's palette maps them to grey levels.
T = IntEnum("T", (
    "BG AIR FAT SOFT MUSCLE LUNG VESSEL HEART BONE MARROW CSF GREY WHITE LIVER SPLEEN KIDNEY SINUS "
    "BOWEL FLUID TABLE CARTILAGE TENDON THYROID WALL PLEURA PTX NODULE MASS CYST BLOOD INFARCT STONE "
    "OEDEMA HALO RIB CLAVICLE SCAPULA SPINE HUMERUS SCALP"
), start=0)
BRAIN = (T.GREY, T.WHITE)
# (mean grey level, texture amplitude) per tissue; X-ray has a second, additive bone layer.
_PALETTES: dict[str, tuple[dict, ...]] = {
    "x-ray": (
        {T.BG: .03, T.FAT: .27, T.SOFT: .34, T.LIVER: .48, T.LUNG: (.13, .03), T.VESSEL: .2, T.HEART: .56,
         T.FLUID: .5, T.PTX: .02, T.PLEURA: .4, T.NODULE: .5},
        {T.RIB: .13, T.CLAVICLE: .3, T.SCAPULA: .17, T.SPINE: .2, T.HUMERUS: .35, T.BONE: .48, T.MARROW: .36},
    ),
    "ct": ({T.AIR: 0, T.FAT: .2, T.SOFT: .45, T.MUSCLE: .5, T.LUNG: (.16, .02), T.VESSEL: .8, T.HEART: .55,
            T.BONE: .97, T.MARROW: .72, T.CSF: .2, T.GREY: (.52, .02), T.WHITE: (.43, .02), T.SCALP: .45,
            T.LIVER: (.6, .03), T.SPLEEN: .57, T.KIDNEY: .78, T.SINUS: .3, T.BOWEL: (.45, .06), T.FLUID: .38,
            T.TABLE: .5, T.PLEURA: .45, T.PTX: 0, T.NODULE: .58, T.MASS: (.46, .14),
            T.CYST: .28, T.BLOOD: .86, T.INFARCT: .25, T.STONE: 1.0},),
    "mri": ({T.AIR: .02, T.FAT: .2, T.SOFT: .4, T.MUSCLE: (.34, .04), T.BONE: .04, T.MARROW: (.27, .05),
             T.CSF: .95, T.GREY: (.55, .02), T.WHITE: (.37, .02), T.SCALP: .68, T.CARTILAGE: .45, T.TENDON: .05,
             T.FLUID: .95, T.CYST: .98, T.MASS: (.6, .18), T.OEDEMA: .8, T.VESSEL: .05},),
    "ultrasound": ({T.FAT: .5, T.SOFT: .42, T.MUSCLE: .28, T.LIVER: (.5, .05), T.FLUID: .03, T.WALL: .9,
                    T.KIDNEY: .32, T.SINUS: .8, T.THYROID: (.62, .04), T.AIR: .05, T.BONE: .95, T.CYST: .03,
                    T.MASS: (.8, .15), T.HALO: .08, T.NODULE: .16, T.STONE: 1.0, T.VESSEL: .03},),
}


@lru_cache(maxsize=None)
def _palette(modality: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, texture amplitude) lookup arrays indexed by tissue label."""
    mean, amp = np.zeros(256, np.float32), np.zeros(256, np.float32)
    for tissue, value in _PALETTES[modality][layer].items():
        mean[tissue], amp[tissue] = value if isinstance(value, tuple) else (value, 0.0)
    return mean, amp


class _Canvas:
    """Tissue-label layers drawn in unit coordinates (x right, y down) through a jittered affine."""

    def __init__(self, size: int, rng: np.random.Generator, shift: float = 0.03, rotate_deg: float = 3.0,
                 fills: Sequence[int] = (0, 0)):
        self.size = size
        self.layers = [Image.new("L", (size, size), fill) for fill in fills]
        self._draws = [ImageDraw.Draw(layer) for layer in self.layers]
        self.scale = 1.0 + rng.uniform(-0.05, 0.04)
        angle = math.radians(rng.uniform(-rotate_deg, rotate_deg))
        self._matrix = self.scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        self._offset = 0.5 + rng.uniform(-shift, shift, 2)
        self.texts: list[tuple[str, float, float, float]] = []  # overlays in image fractions: text, x, y, height
        self.marks: list[tuple[float, float, float]] = []  # lesion centre and radius in pixels, for arrows
        self.sector: tuple[float, ...] | None = None  # ultrasound fan: apex x, apex y, r0, r1, half-angle

    def px(self, points) -> np.ndarray:
        """Unit coordinates to pixel coordinates."""
        points = np.asarray(points, np.float64).reshape(-1, 2)
        return ((points - 0.5) @ self._matrix.T + self._offset) * self.size

    def poly(self, points, value: int, layer: int = 0, within: Sequence[int] | None = None,
             exclude=None) -> None:
        """Fill a polygon (only over `within` tissues and outside the `exclude` polygon when given)."""
        self._paint(layer, value, [(self.px(points), 0)], within, None if exclude is None else self.px(exclude))

    def polys(self, polygons, value: int, layer: int = 0, within: Sequence[int] | None = None) -> None:
        """Fill several polygons at once (one masked paint)."""
        self._paint(layer, value, [(self.px(points), 0) for points in polygons], within)

    def line(self, points, width: float, value: int, layer: int = 0, within: Sequence[int] | None = None) -> None:
        """A polyline `width` (image fraction) wide with rounded joints."""
        self.lines([points], width, value, layer, within)

    def lines(self, polylines, width: float, value: int, layer: int = 0, within: Sequence[int] | None = None) -> None:
        """Several polylines of one width at once (one masked paint)."""
        px_width = max(1, round(width * self.size * self.scale))
        self._paint(layer, value, [(self.px(points), px_width) for points in polylines], within)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, value: int, angle: float = 0.0,
                layer: int = 0, within: Sequence[int] | None = None) -> None:
        """A filled (rotated) ellipse."""
        self.poly(_ellipse(cx, cy, rx, ry, angle), value, layer, within)

    def capsule(self, p0, p1, width: float, value: int, layer: int = 0) -> None:
        """A thick segment with round ends (a long bone, a finger)."""
        self.line([p0, p1], width, value, layer)
        for p in (p0, p1):
            self.poly(_ellipse(p[0], p[1], width / 2, width / 2, n=12), value, layer)

    def text(self, text: str, x: float, y: float, height: float) -> None:
        """An annotation burnt into the image after noise (x, y, height as image fractions)."""
        self.texts.append((text, x, y, height))

    def mark(self, cx: float, cy: float, diameter: float) -> None:
        """Remember a lesion's place so an arrow can point at it."""
        x, y = self.px([(cx, cy)])[0]
        self.marks.append((x, y, diameter / 2 * self.size * self.scale))

    def labels(self, layer: int = 0) -> np.ndarray:
        return np.asarray(self.layers[layer])

    def _paint(self, layer: int, value: int, shapes: list[tuple[np.ndarray, int]], within=None,
               exclude=None) -> None:
        """Polygons (width 0) and polylines; masked paints work on the shapes' bounding box only."""
        if within is None and exclude is None:
            for xy, width in shapes:
                _draw_shape(self._draws[layer], xy, width, int(value))
            return
        pad = max(width for _, width in shapes)
        every = np.concatenate([xy for xy, _ in shapes])
        lo = np.clip(np.floor(every.min(0)) - pad, 0, self.size).astype(int)
        hi = np.clip(np.ceil(every.max(0)) + pad + 1, 0, self.size).astype(int)
        if (hi <= lo).any():
            return
        mask = Image.new("L", tuple(hi - lo), 0)
        draw = ImageDraw.Draw(mask)
        for xy, width in shapes:
            _draw_shape(draw, xy - lo, width, 255)
        if exclude is not None:
            _draw_shape(draw, exclude - lo, 0, 0)
        if within is not None:
            box = np.asarray(self.layers[layer].crop((*lo, *hi)))
            allowed = np.isin(box, np.asarray(within, np.uint8))
            mask = Image.fromarray(np.where(allowed, np.asarray(mask), 0).astype(np.uint8))
        self.layers[layer].paste(int(value), (*lo, *hi), mask)


def _draw_shape(draw: ImageDraw.ImageDraw, xy: np.ndarray, width: int, value: int) -> None:
    coords = xy.ravel().tolist()
    if width:
        draw.line(coords, fill=value, width=width, joint="curve")
    else:
        draw.polygon(coords, fill=value)


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 36,
             radius: np.ndarray | float = 1.0) -> np.ndarray:
    cos_t, sin_t = _circle(n)
    x, y = rx * radius * cos_t, ry * radius * sin_t
    ca, sa = math.cos(angle), math.sin(angle)
    return np.stack([cx + ca * x - sa * y, cy + sa * x + ca * y], axis=1)


@lru_cache(maxsize=4)
def _circle(n: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.cos(t), np.sin(t)


def _blob_points(rng: np.random.Generator, cx: float, cy: float, diameter: float, irregular: float = 0.0,
                 aspect: float = 1.0, n: int = 36) -> np.ndarray:
    """A round, lobulated or irregular outline about `diameter` across."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    k = np.arange(2, 6)[:, None]
    wobble = (rng.uniform(0, 1, (4, 1)) / k * np.cos(k * t + rng.uniform(0, 2 * np.pi, (4, 1)))).sum(0)
    radius = 1 + irregular * wobble
    return _ellipse(cx, cy, diameter / 2, diameter / 2 * aspect, rng.uniform(0, np.pi), n, radius)


@dataclass
class _Lesion:
    """The finding to draw: what, on which image side (-1 left, +1 right, 0 not visible), how big."""

    finding: str
    side: int
    size: str | None
    rng: np.random.Generator

    def __post_init__(self):
        self.diameter = self.rng.uniform(*SIZE_RANGES[self.size]) if self.size else 0.0

    @property
    def large(self) -> bool:
        return self.size == "large"

    def pick(self, small: float, large: float, jitter: float = 0.1) -> float:
        """A size-dependent extent (effusion height, wedge depth) with a little jitter."""
        return (large if self.large else small) * self.rng.uniform(1 - jitter, 1 + jitter)


def _blob(c: _Canvas, lesion: _Lesion, cx: float, cy: float, tissue: int, irregular: float = 0.05,
          within=None, scale: float = 1.0, aspect: float = 1.0) -> None:
    """A focal lesion of the lesion's diameter (times `scale`), remembered for the arrow."""
    d = lesion.diameter * scale
    c.poly(_blob_points(lesion.rng, cx, cy, d, irregular, aspect), tissue, within=within)
    if scale == 1.0:
        c.mark(cx, cy, d)


def _jitter(rng: np.random.Generator, value: float, amount: float) -> float:
    return value + rng.uniform(-amount, amount)


# ----------------------------------------------------------------------------- chest
def _lung_outline(s: int, top: float, bottom: float, medial: float, lateral: float, dome: float) -> np.ndarray:
    """A frontal lung: apex, convex lateral wall, sharp costophrenic angle, domed diaphragm, straight medial side."""
    xm, xl = 0.5 + s * medial, 0.5 + s * lateral
    apex = 0.5 + s * (medial + 0.4 * (lateral - medial))
    t = np.linspace(0, 1, 14)
    side = np.stack([apex + (xl - apex) * np.sin(t * np.pi / 2) ** 0.55, top + (bottom - top) * t], 1)
    u = np.linspace(0, 1, 10)[1:]
    base = np.stack([xl + (xm - xl) * u, bottom - dome * (1 - (1 - u) ** 2)], 1)
    medial_side = np.array([[xm + s * 0.01, top + 0.35 * (bottom - top)], [apex - s * 0.03, top + 0.04]])
    return np.concatenate([side, base, medial_side])


def _chest_lesion(c: _Canvas, lesion: _Lesion, lungs: dict[int, np.ndarray], anchors: dict[int, tuple], rise: int,
                  effusion: tuple[float, float]) -> None:
    """Nodule, effusion (`effusion` = small, large fluid heights) or pneumothorax in the lesion's lung."""
    side = lesion.side if lesion.side in lungs else next(iter(lungs))
    lung, rng = lungs[side], lesion.rng
    lo, hi = lung.min(0), lung.max(0)
    if lesion.finding == "nodule":
        cx, cy = (lo + hi) / 2 + rng.uniform(-0.18, 0.18, 2) * (hi - lo)
        _blob(c, lesion, cx, cy, T.NODULE, 0.06)
    elif lesion.finding == "effusion":
        level = hi[1] - lesion.pick(*effusion)
        tilt = 0.06 * (rise or side)
        x0, x1 = lo[0] - 0.03, hi[0] + 0.03
        c.poly([(x0, level + tilt / 2), (x1, level - tilt / 2), (x1, 1.2), (x0, 1.2)], T.FLUID,
               within=(T.LUNG, T.VESSEL))
        c.mark((lo[0] + hi[0]) / 2, (level + hi[1]) / 2, hi[1] - level)
    else:  # pneumothorax: the lung falls away from the chest wall towards its anchor
        anchor = np.asarray(anchors[side])
        collapsed = anchor + lesion.pick(0.87, 0.45, 0.03) * (lung - anchor)
        c.poly(lung, T.PTX, within=(T.LUNG, T.VESSEL), exclude=collapsed)
        c.line(collapsed[:16], 0.006, T.PLEURA, within=(T.PTX, T.LUNG, T.VESSEL))
        c.mark(*(lung[:16].mean(0) * 0.5 + collapsed[:16].mean(0) * 0.5), 0.1)


def _lung_markings(c: _Canvas, rng: np.random.Generator, hilum: tuple[float, float], lung: np.ndarray, n: int = 10):
    """Branching vessels fanning out from the hilum, kept inside the lung."""
    ends = lung[rng.choice(len(lung), n, replace=False)]
    mids = (np.asarray(hilum) + ends) / 2 + rng.uniform(-0.03, 0.03, ends.shape)
    c.lines([[hilum, mid, end] for mid, end in zip(mids, ends)], 0.006, T.VESSEL, within=(T.LUNG,))


def _chest_xray(c: _Canvas, rng: np.random.Generator, view: str, lesion: _Lesion | None) -> None:
    ap = view == "ap"
    w = rng.uniform(0.95, 1.04)
    c.poly([(0.02, 1.1), (0.03, 0.3), (0.1, 0.15), (0.36, 0.08), (0.42, -0.1), (0.58, -0.1), (0.64, 0.08),
            (0.9, 0.15), (0.97, 0.3), (0.98, 1.1)], T.SOFT)
    c.ellipse(0.5, 1.02, 0.45, 0.26, T.LIVER)
    lungs = {s: _lung_outline(s, _jitter(rng, 0.13, 0.015), _jitter(rng, 0.8, 0.02) - (0.03 if s < 0 else 0),
                              0.06 + (0.04 if s > 0 else 0), 0.36 * w, _jitter(rng, 0.09, 0.015)) for s in (-1, 1)}
    for s, lung in lungs.items():
        c.poly(lung, T.LUNG)
        _lung_markings(c, rng, (0.5 + s * 0.1, 0.45), lung)
    c.poly([(0.45, 0.05), (0.55, 0.05), (0.57, 0.5), (0.43, 0.5)], T.HEART)
    c.ellipse(0.565, 0.37, 0.04, 0.035, T.HEART)
    heart = (1.18 if ap else 1.0) * rng.uniform(0.93, 1.07)
    c.ellipse(0.545, 0.61, 0.15 * heart, 0.105 * heart, T.HEART, angle=0.35)
    c.line([(0.5, -0.05), (0.5, 1.05)], 0.065, T.SPINE, layer=1)
    for s in (-1, 1):
        _ribs(c, s, rng)
        clavicle = [(0.04, 0.17), (0.15, 0.165), (0.28, 0.115)] if not ap else [(0.04, 0.13), (0.16, 0.12),
                                                                                  (0.3, 0.105)]
        c.line([(0.5 + s * x, y) for x, y in clavicle], 0.022, T.CLAVICLE, layer=1)
        scapula = [(0.37, 0.13), (0.47, 0.15), (0.43, 0.47)] if not ap else [(0.22, 0.14), (0.4, 0.13),
                                                                                 (0.29, 0.48)]
        c.poly([(0.5 + s * x, y) for x, y in scapula], T.SCAPULA, layer=1)
        c.capsule((0.5 + s * 0.44, 0.15), (0.5 + s * 0.48, 0.55), 0.07, T.HUMERUS, layer=1)
    _corner_marker(c, rng, ["AP", "AP SUPINE", "AP PORTABLE"][int(rng.integers(3))] if ap else "PA")
    if lesion:
        anchors = {s: (0.5 + s * 0.1, lung[:, 1].max()) for s, lung in lungs.items()}
        _chest_lesion(c, lesion, lungs, anchors, 0, (0.2, 0.4))


def _ribs(c: _Canvas, s: int, rng: np.random.Generator) -> None:
    t = np.linspace(0, 1, 9)
    for k in range(10):
        y0 = 0.13 + 0.068 * k + rng.uniform(-0.005, 0.005)
        pts = np.stack([0.5 + s * (0.035 + 0.36 * t), y0 - 0.05 * np.sin(np.pi * t * 0.8) + 0.1 * t ** 3], 1)
        c.line(pts, 0.013, T.RIB, layer=1)


def _corner_marker(c: _Canvas, rng: np.random.Generator, text: str) -> None:
    x = rng.uniform(0.04, 0.08) if rng.random() < 0.5 else rng.uniform(0.92, 0.96) - 0.045 * len(text)
    c.text(text, x, rng.uniform(0.03, 0.06), 0.065)


def _chest_ct(c: _Canvas, rng: np.random.Generator, view: str, lesion: _Lesion | None) -> None:
    if view == "axial":
        _axial_trunk(c, rng, 0.29, 0.04)
        lungs = {s: _ellipse(0.5 + s * 0.18, 0.51, 0.15, 0.19 * rng.uniform(0.95, 1.05), s * 0.1) for s in (-1, 1)}
        for s, lung in lungs.items():
            c.poly(lung, T.LUNG)
            _lung_vessels(c, rng, lung, 14)
        c.ellipse(0.54, 0.42, 0.12, 0.1, T.HEART, angle=0.3)
        c.ellipse(0.55, 0.42, 0.05, 0.045, T.VESSEL)
        c.ellipse(0.56, 0.6, 0.033, 0.033, T.VESSEL)
        c.ellipse(0.5, 0.25, 0.035, 0.018, T.BONE)
        _vertebra(c, 0.5, 0.68)
        for a in np.linspace(0.35, 2.8, 8):
            for s in (-1, 1):
                c.ellipse(0.5 + s * 0.37 * math.cos(a), 0.52 + 0.235 * math.sin(a), 0.014, 0.01, T.BONE, s * a)
        anchors = {s: (0.5 + s * 0.08, 0.69) for s in lungs}
        rise, effusion = 0, (0.07, 0.19)
    elif view == "coronal":
        c.poly([(0.06, 1.1), (0.08, 0.2), (0.2, 0.06), (0.8, 0.06), (0.92, 0.2), (0.94, 1.1)], T.FAT)
        c.poly([(0.1, 1.1), (0.12, 0.22), (0.23, 0.1), (0.77, 0.1), (0.88, 0.22), (0.9, 1.1)], T.MUSCLE)
        c.ellipse(0.34, 0.92, 0.24, 0.14, T.LIVER)
        c.ellipse(0.68, 0.9, 0.16, 0.12, T.SOFT)
        lungs = {s: _lung_outline(s, _jitter(rng, 0.12, 0.015), _jitter(rng, 0.78, 0.02) - (0.03 if s < 0 else 0),
                                  0.06 + (0.04 if s > 0 else 0), 0.35, 0.08) for s in (-1, 1)}
        for s, lung in lungs.items():
            c.poly(lung, T.LUNG)
            _lung_vessels(c, rng, lung, 14)
        c.line([(0.5, 0.0), (0.5, 0.33), (0.44, 0.42)], 0.035, T.AIR)
        c.line([(0.5, 0.33), (0.57, 0.41)], 0.03, T.AIR)
        c.ellipse(0.53, 0.62, 0.14, 0.13, T.HEART, angle=-0.3)
        c.ellipse(0.54, 0.44, 0.04, 0.05, T.VESSEL)
        for s in (-1, 1):
            for y in np.linspace(0.22, 0.74, 6):
                c.ellipse(0.5 + s * _jitter(rng, 0.39, 0.01), y, 0.016, 0.011, T.BONE)
        anchors = {s: (0.5 + s * 0.1, lung[:, 1].max()) for s, lung in lungs.items()}
        rise, effusion = 0, (0.2, 0.4)
    else:
        _sagittal_trunk(c, rng)
        lung = np.array([(0.47, 0.1), (0.37, 0.14), (0.27, 0.3), (0.25, 0.55), (0.3, 0.68), (0.45, 0.66),
                         (0.6, 0.7), (0.71, 0.8), (0.74, 0.55), (0.72, 0.3), (0.6, 0.13)])
        lung = lung + rng.uniform(-0.01, 0.01, lung.shape)
        c.poly(lung, T.LUNG)
        _lung_vessels(c, rng, lung, 16)
        c.line([(0.65, 0.2), (0.38, 0.72)], 0.004, T.PLEURA, within=(T.LUNG, T.VESSEL))
        c.ellipse(0.4, 0.66, 0.14, 0.11, T.HEART, angle=-0.4)
        c.ellipse(0.45, 0.9, 0.25, 0.16, T.LIVER)
        lungs, anchors, rise, effusion = {0: lung}, {0: (0.5, 0.75)}, 1, (0.12, 0.33)
    if lesion:
        _chest_lesion(c, lesion, lungs, anchors, rise, effusion)


def _axial_trunk(c: _Canvas, rng: np.random.Generator, half_depth: float, inner_fat: float) -> None:
    """Axial body on the CT table: subcutaneous fat, muscle wall, fat inside it."""
    t = np.linspace(0, 1, 12)
    c.line(np.stack([0.12 + 0.76 * t, 0.86 + 0.03 * np.sin(np.pi * t)], 1), 0.02, T.TABLE)
    c.ellipse(0.5, 0.52, _jitter(rng, 0.43, 0.02), _jitter(rng, half_depth, 0.015), T.FAT)
    c.ellipse(0.5, 0.52, 0.39, half_depth - 0.035, T.MUSCLE)
    c.ellipse(0.5, 0.52, 0.39 - inner_fat, half_depth - 0.035 - inner_fat, T.FAT)


def _lung_vessels(c: _Canvas, rng: np.random.Generator, lung: np.ndarray, n: int) -> None:
    """Vessels in cross-section: small bright dots scattered over the lung."""
    centres, radii = rng.uniform(lung.min(0), lung.max(0), (n, 2)), 0.006 * rng.uniform(0.6, 1.4, n)
    c.polys([_ellipse(x, y, r, r, n=12) for (x, y), r in zip(centres, radii)], T.VESSEL, within=(T.LUNG,))


def _vertebra(c: _Canvas, cx: float, cy: float) -> None:
    """Axial vertebra: body, canal, spinous process."""
    c.line([(cx, cy + 0.04), (cx, cy + 0.11)], 0.02, T.BONE)
    c.line([(cx - 0.045, cy + 0.08), (cx, cy + 0.04), (cx + 0.045, cy + 0.08)], 0.016, T.BONE)
    c.ellipse(cx, cy, 0.05, 0.042, T.BONE)
    c.ellipse(cx, cy, 0.038, 0.03, T.MARROW)
    c.ellipse(cx, cy + 0.06, 0.018, 0.016, T.FLUID)


def _sagittal_trunk(c: _Canvas, rng: np.random.Generator) -> None:
    """Sagittal body wall and spine (anterior on the image's left)."""
    c.poly([(0.14, -0.1), (0.16, 0.5), (0.2, 1.1), (0.9, 1.1), (0.88, -0.1)], T.FAT)
    c.poly([(0.18, -0.1), (0.2, 0.5), (0.24, 1.1), (0.85, 1.1), (0.84, -0.1)], T.MUSCLE)
    c.poly([(0.21, -0.1), (0.23, 0.5), (0.27, 1.1), (0.76, 1.1), (0.76, -0.1)], T.FAT)
    for k in range(-1, 12):
        y = 0.02 + 0.095 * k + rng.uniform(-0.004, 0.004)
        c.poly([(0.76, y), (0.84, y + 0.005), (0.84, y + 0.075), (0.76, y + 0.07)], T.BONE)
        c.poly([(0.77, y + 0.01), (0.83, y + 0.015), (0.83, y + 0.065), (0.77, y + 0.06)], T.MARROW)
    c.line([(0.865, -0.1), (0.865, 1.1)], 0.02, T.FLUID)


# ----------------------------------------------------------------------------- hands
def _hands_xray(c: _Canvas, rng: np.random.Generator, view: str, lesion: _Lesion | None) -> None:
    """Both hands, PA or oblique, thumbs towards the middle; the patient's right hand on the image's left."""
    oblique = view == "oblique"
    radii = {s: _Hand(s, 0.5 + s * 0.26, 0.7, 1.45, 0.62 if oblique else 1.0).draw(c, rng, oblique) for s in (-1, 1)}
    c.text("R", 0.04, 0.9, 0.07)
    c.text("L", 0.91, 0.9, 0.07)
    _corner_marker(c, rng, "OBL" if oblique else "PA")
    if lesion:
        _fracture(c, lesion, radii[lesion.side])


@dataclass
class _Hand:
    """One hand in local coordinates (u towards the little finger, v down, wrist at 0) mapped into the image."""

    s: int
    cx: float
    wrist_y: float
    k: float
    squeeze: float

    def at(self, u: float, v: float) -> tuple[float, float]:
        return self.cx + self.s * self.k * self.squeeze * u, self.wrist_y + self.k * v

    def width(self, w: float) -> float:
        """A bone or finger width, narrower when the hand is turned oblique."""
        return w * self.k * (0.75 + 0.25 * self.squeeze)

    def draw(self, c: _Canvas, rng: np.random.Generator, oblique: bool) -> tuple:
        """Soft tissue, then bones on the bone layer; returns the radius (shaft end, distal end) and the hand."""
        spread, flex = rng.uniform(0.9, 1.12), (0.85 if oblique else 1.0)
        rays = [(-0.06, -0.02, -(0.6 if oblique else 0.45) * spread, (0.09, 0.075, 0.055), (0.026, 0.022, 0.018))]
        for u0, angle, scale in zip((-0.034, -0.008, 0.018, 0.043), (-0.12, 0.0, 0.1, 0.22), (0.97, 1.0, 0.96, 0.82)):
            lengths = (0.16 * scale, 0.095 * scale * flex, 0.06 * scale * flex, 0.042 * scale * flex)
            rays.append((u0, -0.06, angle * spread, lengths, (0.024, 0.021, 0.018, 0.016)))
        chains = [self._chain(*ray[:4]) for ray in rays]
        palm = ((-0.072, 0.02), (-0.1, -0.05), (-0.075, -0.12), (-0.05, -0.23), (0.07, -0.2), (0.075, -0.05),
                (0.07, 0.02))
        c.poly([self.at(u, v) for u, v in palm], T.FAT)
        c.poly([self.at(u, v) for u, v in ((-0.072, 0.0), (0.07, 0.0), (0.085, 0.5), (-0.085, 0.5))], T.FAT)
        for joints in chains:
            c.capsule(joints[1], joints[-1], self.width(0.05), T.FAT)
        for ray, joints in zip(rays, chains):
            for a, b, w in zip(joints[:-1], joints[1:], ray[4]):
                self.bone(c, a, b, w)
        for u, v in ((-0.045, -0.02), (-0.015, -0.025), (0.015, -0.025), (0.043, -0.02),
                     (-0.05, -0.05), (-0.02, -0.055), (0.012, -0.055), (0.04, -0.05)):
            x, y = self.at(u + rng.uniform(-0.003, 0.003), v)
            c.ellipse(x, y, 0.015 * self.k * self.squeeze ** 0.5, 0.013 * self.k, T.BONE, layer=1)
        radius = (self.at(-0.042, 0.5), self.at(-0.042, 0.012))
        self.bone(c, *radius, 0.04)
        c.ellipse(*radius[1], 0.034 * self.k * self.squeeze ** 0.5, 0.018 * self.k, T.BONE, layer=1)
        self.bone(c, self.at(0.045, 0.5), self.at(0.042, 0.02), 0.03)
        return radius + (self,)

    def _chain(self, u0, v0, angle, lengths) -> list[tuple[float, float]]:
        """Joint positions along one ray (metacarpal and phalanges), small gaps at the joints."""
        du, dv = math.sin(angle), -math.cos(angle)
        joints, u, v = [self.at(u0, v0)], u0, v0
        for length in lengths:
            u, v = u + du * length, v + dv * length
            joints.append(self.at(u - du * 0.008, v - dv * 0.008))
        return joints

    def bone(self, c: _Canvas, a, b, width: float) -> None:
        """Cortex with a fainter medullary line inside."""
        w = self.width(width)
        c.capsule(a, b, w, T.BONE, layer=1)
        inner = (np.asarray(a) * 0.85 + np.asarray(b) * 0.15, np.asarray(a) * 0.15 + np.asarray(b) * 0.85)
        c.line(inner, w * 0.4, T.MARROW, layer=1)


def _fracture(c: _Canvas, lesion: _Lesion, radius: tuple) -> None:
    """Distal radius fracture: a lucent gap with the distal fragment displaced towards the thumb and angulated."""
    shaft, distal, hand = np.asarray(radius[0]), np.asarray(radius[1]), radius[2]
    f = distal + (shaft - distal) * lesion.rng.uniform(0.1, 0.14)
    half, s = 0.045 * hand.k * hand.squeeze ** 0.5, hand.s
    c.poly([(distal[0] - half, distal[1] - 0.01), (distal[0] + half, distal[1] - 0.01),
            (f[0] + half, f[1] + 0.012 * s), (f[0] - half, f[1] - 0.012 * s)], T.BG, layer=1)
    shift = np.array([-s * 0.024 * hand.squeeze, 0.006])
    top = distal + shift + np.array([-s * 0.012, 0.0])
    hand.bone(c, f + shift + np.array([0, -0.014]), top, 0.04)
    c.ellipse(*top, 0.034 * hand.k * hand.squeeze ** 0.5, 0.018 * hand.k, T.BONE, angle=-s * 0.3, layer=1)
    c.mark(*(f + top) / 2, 0.08)


# ----------------------------------------------------------------------------- head and brain
def _head(c: _Canvas, rng: np.random.Generator, view: str, lesion: _Lesion | None) -> None:
    """Head in three planes; CT and MRI share the anatomy and differ in palette."""
    if view == "axial":
        rx, ry = _jitter(rng, 0.35, 0.015), _jitter(rng, 0.43, 0.015)
        for scale, tissue in ((1.0, T.SCALP), (0.955, T.BONE), (0.91, T.CSF), (0.885, T.GREY)):
            c.ellipse(0.5, 0.5, rx * scale, ry * scale, tissue)
        for s in (-1, 1):
            c.ellipse(0.5 + s * 0.135, 0.5, 0.14, 0.3, T.WHITE)
            c.ellipse(0.5 + s * 0.04, 0.4, 0.022, 0.1, T.CSF, angle=-s * 0.3)
            c.ellipse(0.5 + s * 0.06, 0.62, 0.02, 0.07, T.CSF, angle=s * 0.4)
        c.line([(0.5, 0.12), (0.5, 0.88)], 0.008, T.CSF, within=BRAIN)
        brain, rows = (0.5, 0.5, rx * 0.885, ry * 0.885), (0.35, 0.65)
    elif view == "coronal":
        c.poly([(0.3, 1.1), (0.3, 0.7), (0.7, 0.7), (0.7, 1.1)], T.SCALP)
        for scale, tissue in ((1.0, T.SCALP), (0.955, T.BONE), (0.91, T.CSF), (0.885, T.GREY)):
            c.ellipse(0.5, 0.45, 0.36 * scale, 0.38 * scale, tissue)
        c.line([(0.16, 0.66), (0.36, 0.76), (0.64, 0.76), (0.84, 0.66)], 0.035, T.BONE)
        for s in (-1, 1):
            c.ellipse(0.5 + s * 0.2, 0.66, 0.09, 0.055, T.GREY)
            c.ellipse(0.5 + s * 0.13, 0.42, 0.12, 0.18, T.WHITE)
            c.ellipse(0.5 + s * 0.04, 0.47, 0.018, 0.06, T.CSF, angle=s * 0.35)
        c.line([(0.5, 0.1), (0.5, 0.45)], 0.008, T.CSF, within=BRAIN)
        c.ellipse(0.5, 0.74, 0.045, 0.1, T.WHITE)
        brain, rows = (0.5, 0.45, 0.32, 0.34), (0.3, 0.52)
    else:
        c.poly([(0.22, 0.35), (0.13, 0.58), (0.1, 0.62), (0.16, 0.68), (0.17, 0.78), (0.22, 0.9), (0.38, 1.1),
                (0.7, 1.1), (0.72, 0.78)], T.SCALP)
        for scale, tissue in ((1.0, T.SCALP), (0.955, T.BONE), (0.91, T.CSF), (0.885, T.GREY)):
            c.ellipse(0.55, 0.43, 0.38 * scale, 0.33 * scale, tissue)
        c.line([(0.25, 0.58), (0.45, 0.62), (0.62, 0.6), (0.76, 0.68)], 0.03, T.BONE)
        c.ellipse(0.27, 0.34, 0.04, 0.03, T.AIR)
        c.ellipse(0.38, 0.6, 0.035, 0.025, T.AIR)
        c.ellipse(0.55, 0.38, 0.25, 0.17, T.WHITE)
        c.ellipse(0.72, 0.62, 0.12, 0.085, T.GREY)
        c.ellipse(0.72, 0.62, 0.06, 0.04, T.WHITE)
        c.ellipse(0.58, 0.7, 0.04, 0.15, T.WHITE, angle=-0.3)
        t = np.linspace(0, 1, 10)
        arc = np.stack([0.4 + 0.3 * t, 0.44 - 0.08 * np.sin(np.pi * t)], 1)
        c.line(arc, 0.03, T.CSF)
        c.line(arc - [0, 0.025], 0.022, T.WHITE)
        brain, rows = (0.55, 0.43, 0.336, 0.29), (0.22, 0.34)
    _sulci(c, rng, *brain)
    if lesion:
        _brain_lesion(c, lesion, brain, rows)


def _sulci(c: _Canvas, rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float) -> None:
    """Short, slightly bent CSF clefts running in from the brain surface."""
    clefts = []
    for a in rng.uniform(0, 2 * np.pi, 20):
        bend = rng.uniform(-0.06, 0.06)
        depths = (1.02, 1 - rng.uniform(0.05, 0.08), 1 - rng.uniform(0.1, 0.16))
        clefts.append([(cx + rx * d * math.cos(a + bend * i), cy + ry * d * math.sin(a + bend * i))
                       for i, d in enumerate(depths)])
    c.lines(clefts, 0.006, T.CSF, within=BRAIN)


def _brain_lesion(c: _Canvas, lesion: _Lesion, brain: tuple[float, ...], rows: tuple[float, float]) -> None:
    """Haemorrhage, infarct, mass or cyst in one hemisphere (anywhere in a sagittal slice).

    `brain` is the brain's ellipse (cx, cy, rx, ry); focal lesions are centred between `rows`.
    """
    rng = lesion.rng
    cy = rng.uniform(*rows)
    cx = 0.5 + lesion.side * rng.uniform(0.16, 0.2) if lesion.side else rng.uniform(0.38, 0.7)
    if lesion.finding == "infarct":  # a wedge with its base on the cortex
        depth, width = lesion.pick(0.11, 0.22), lesion.pick(0.06, 0.12)
        angle = rng.uniform(-0.5, 0.5) + (0.0 if lesion.side > 0 else np.pi if lesion.side < 0 else -np.pi / 2)
        out, across = np.array([math.cos(angle), math.sin(angle)]), np.array([-math.sin(angle), math.cos(angle)])
        surface = np.array(brain[:2]) + np.array(brain[2:]) * out
        wedge = [surface + out * 0.05 + across * width, surface + out * 0.05 - across * width, surface - out * depth]
        c.poly(wedge, T.INFARCT, within=BRAIN)
        c.mark(*(surface - out * depth / 2), max(depth, width))
    elif lesion.finding == "haemorrhage":
        _blob(c, lesion, cx, cy, T.BLOOD, 0.25, within=BRAIN + (T.CSF,), aspect=0.8)
    elif lesion.finding == "mass":
        _blob(c, lesion, cx, cy, T.OEDEMA, 0.5, within=BRAIN, scale=1.6)
        _blob(c, lesion, cx, cy, T.MASS, 0.3)
    else:
        _blob(c, lesion, cx, cy, T.CYST, 0.02)


# ----------------------------------------------------------------------------- abdomen CT
def _abdomen_ct(c: _Canvas, rng: np.random.Generator, view: str, lesion: _Lesion | None) -> None:
    if view == "axial":
        _axial_trunk(c, rng, 0.31, 0.02)
        c.ellipse(0.33, 0.45, 0.18, 0.17, T.LIVER, angle=0.2)
        c.ellipse(0.75, 0.52, 0.07, 0.11, T.SPLEEN, angle=-0.4)
        c.ellipse(0.63, 0.38, 0.1, 0.07, T.BOWEL)
        c.ellipse(0.63, 0.34, 0.05, 0.025, T.AIR)
        _bowel_loops(c, rng, (0.4, 0.62), (0.28, 0.4), 5)
        kidneys = {s: (0.5 + s * 0.19, 0.6) for s in (-1, 1)}
        for s, (kx, ky) in kidneys.items():
            c.ellipse(kx, ky, 0.058, 0.08, T.KIDNEY, angle=-s * 0.35)
            c.ellipse(kx - s * 0.025, ky, 0.02, 0.03, T.SINUS, angle=-s * 0.35)
            c.ellipse(0.5 + s * 0.085, 0.66, 0.035, 0.045, T.MUSCLE)
            c.ellipse(0.5 + s * 0.08, 0.755, 0.055, 0.04, T.MUSCLE)
        _vertebra(c, 0.5, 0.65)
        c.ellipse(0.53, 0.57, 0.027, 0.027, T.VESSEL)
        c.ellipse(0.455, 0.565, 0.03, 0.022, T.SOFT)
        spread = (0.03, 0.03)
    elif view == "coronal":
        c.poly([(0.06, 1.1), (0.07, 0.1), (0.2, -0.1), (0.8, -0.1), (0.93, 0.1), (0.94, 1.1)], T.FAT)
        c.poly([(0.1, 1.1), (0.11, 0.12), (0.22, -0.1), (0.78, -0.1), (0.89, 0.12), (0.9, 1.1)], T.MUSCLE)
        c.poly([(0.12, 1.1), (0.13, 0.14), (0.24, -0.1), (0.76, -0.1), (0.87, 0.14), (0.88, 1.1)], T.FAT)
        for s in (-1, 1):
            c.ellipse(0.5 + s * 0.2, 0.02, 0.17, 0.09, T.LUNG)
        c.ellipse(0.31, 0.26, 0.2, 0.15, T.LIVER, angle=0.25)
        c.ellipse(0.73, 0.24, 0.08, 0.11, T.SPLEEN, angle=0.3)
        _bowel_loops(c, rng, (0.3, 0.7), (0.62, 0.85), 8)
        kidneys = {s: (0.5 + s * 0.17, 0.45 - s * 0.02) for s in (-1, 1)}
        for s, (kx, ky) in kidneys.items():
            c.ellipse(kx, ky, 0.055, 0.1, T.KIDNEY, angle=s * 0.15)
            c.ellipse(kx - s * 0.02, ky, 0.02, 0.04, T.SINUS, angle=s * 0.15)
            c.poly([(0.5 + s * 0.03, 0.4), (0.5 + s * 0.06, 0.4), (0.5 + s * 0.16, 0.95), (0.5 + s * 0.1, 0.95)],
                   T.MUSCLE)
            c.line([(0.5 + s * 0.12, 0.78), (0.5 + s * 0.3, 0.82), (0.5 + s * 0.36, 0.95)], 0.03, T.BONE)
        for k in range(6):
            y = 0.3 + 0.085 * k
            c.poly([(0.46, y), (0.54, y), (0.545, y + 0.07), (0.455, y + 0.07)], T.BONE)
            c.poly([(0.47, y + 0.01), (0.53, y + 0.01), (0.535, y + 0.06), (0.465, y + 0.06)], T.MARROW)
        spread = (0.025, 0.05)
    else:
        _sagittal_trunk(c, rng)
        c.ellipse(0.6, -0.02, 0.2, 0.08, T.LUNG)
        c.ellipse(0.45, 0.22, 0.27, 0.16, T.LIVER, angle=0.2)
        _bowel_loops(c, rng, (0.3, 0.5), (0.55, 0.9), 6)
        kidneys = {0: (0.6, 0.5)}
        c.ellipse(0.6, 0.5, 0.075, 0.12, T.KIDNEY, angle=0.25)
        c.ellipse(0.59, 0.5, 0.025, 0.05, T.SINUS, angle=0.25)
        c.ellipse(0.7, 0.6, 0.05, 0.2, T.MUSCLE)
        spread = (0.03, 0.05)
    if lesion:
        kx, ky = kidneys[lesion.side if lesion.side in kidneys else 0]
        cx = kx + (lesion.side or 1) * lesion.rng.uniform(0, spread[0])
        cy = ky + lesion.rng.uniform(-spread[1], spread[1])
        tissue, irregular = {"cyst": (T.CYST, 0.02), "mass": (T.MASS, 0.35), "stone": (T.STONE, 0.3)}[lesion.finding]
        _blob(c, lesion, cx, cy, tissue, irregular)


def _bowel_loops(c: _Canvas, rng: np.random.Generator, xs, ys, n: int) -> None:
    for _ in range(n):
        x, y, r = rng.uniform(*xs), rng.uniform(*ys), rng.uniform(0.03, 0.05)
        c.ellipse(x, y, r, r * rng.uniform(0.7, 1.0), T.BOWEL, angle=rng.uniform(0, 3))
        if rng.random() < 0.5:
            c.ellipse(x, y - r * 0.4, r * 0.5, r * 0.3, T.AIR)


# ----------------------------------------------------------------------------- knee MRI
def _knee_mri(c: _Canvas, rng: np.random.Generator, view: str, lesion: _Lesion | None) -> None:
    """Fat-suppressed T2-weighted knee: bright fluid, grey muscle, dark fat, marrow, cortex, tendons, menisci."""
    if view == "sagittal":
        c.poly([(0.12, -0.1), (0.14, 0.35), (0.17, 0.6), (0.22, 1.1), (0.82, 1.1), (0.86, 0.55), (0.84, -0.1)], T.FAT)
        c.poly([(0.5, -0.1), (0.56, 0.3), (0.7, 0.45), (0.72, 0.55), (0.66, 0.72), (0.52, 1.1), (0.79, 1.1),
                (0.82, 0.55), (0.8, -0.1)], T.MUSCLE)
        c.poly([(0.24, -0.1), (0.38, -0.1), (0.42, 0.3), (0.3, 0.32)], T.MUSCLE)
        _long_bone(c, [(0.45, -0.1), (0.57, -0.1), (0.6, 0.33)], (0.52, 0.44), 0.14)
        _long_bone(c, [(0.44, 1.1), (0.6, 1.1), (0.62, 0.62)], (0.5, 0.64), 0.0,
                   plateau=[(0.3, 0.6), (0.72, 0.6), (0.7, 0.72), (0.34, 0.76)])
        c.line([(0.4, 0.58), (0.66, 0.58)], 0.015, T.CARTILAGE)
        c.poly([(0.32, 0.58), (0.4, 0.585), (0.33, 0.6)], T.TENDON)
        c.poly([(0.62, 0.585), (0.71, 0.58), (0.7, 0.6)], T.TENDON)
        c.line([(0.27, 0.3), (0.3, -0.1)], 0.03, T.TENDON)
        c.line([(0.26, 0.44), (0.33, 0.72)], 0.03, T.TENDON)
        c.ellipse(0.26, 0.36, 0.045, 0.08, T.BONE, angle=0.15)
        c.ellipse(0.26, 0.36, 0.03, 0.06, T.MARROW, angle=0.15)
        c.line([(0.58, 0.42), (0.6, 0.5), (0.56, 0.6)], 0.02, T.TENDON)
        c.ellipse(0.75, 0.45, 0.02, 0.04, T.VESSEL)
        effusions = [(0.35, 0.22, 0.03, 0.07), (0.35, 0.2, 0.065, 0.16)]
        cyst_at = (0.72, 0.53)
    elif view == "coronal":
        fibula = float(rng.choice((-1.0, 1.0)))
        c.poly([(0.12, -0.1), (0.16, 0.55), (0.2, 1.1), (0.8, 1.1), (0.84, 0.55), (0.88, -0.1)], T.FAT)
        c.poly([(0.2, -0.1), (0.25, 0.35), (0.75, 0.35), (0.8, -0.1)], T.MUSCLE)
        c.poly([(0.26, 0.75), (0.28, 1.1), (0.72, 1.1), (0.74, 0.75)], T.MUSCLE)
        _long_bone(c, [(0.42, -0.1), (0.58, -0.1), (0.6, 0.38)], (0.4, 0.47), 0.1, twin=(0.6, 0.47))
        c.ellipse(0.5, 0.55, 0.035, 0.06, T.FAT)
        c.line([(0.49, 0.5), (0.52, 0.6)], 0.018, T.TENDON)
        _long_bone(c, [(0.42, 1.1), (0.58, 1.1), (0.6, 0.66)], (0.5, 0.64), 0.0,
                   plateau=[(0.28, 0.6), (0.72, 0.6), (0.66, 0.72), (0.34, 0.72)])
        c.capsule((0.5 + fibula * 0.24, 0.73), (0.5 + fibula * 0.26, 1.1), 0.05, T.BONE)
        c.capsule((0.5 + fibula * 0.24, 0.73), (0.5 + fibula * 0.26, 1.1), 0.03, T.MARROW)
        c.line([(0.32, 0.58), (0.68, 0.58)], 0.014, T.CARTILAGE)
        for s in (-1, 1):
            c.poly([(0.5 + s * 0.3, 0.575), (0.5 + s * 0.2, 0.585), (0.5 + s * 0.3, 0.6)], T.TENDON)
            c.line([(0.5 + s * 0.3, 0.4), (0.5 + s * 0.31, 0.75)], 0.012, T.TENDON)
        effusions = [(0.5 + s * 0.29, 0.38, 0.025, 0.06) for s in (-1, 1)] + \
                    [(0.5 + s * 0.29, 0.36, 0.05, 0.14) for s in (-1, 1)]
        cyst_at = (0.5 - fibula * 0.24, 0.5)
    else:
        c.ellipse(0.5, 0.5, _jitter(rng, 0.42, 0.01), _jitter(rng, 0.4, 0.01), T.FAT)
        c.ellipse(0.5, 0.62, 0.33, 0.26, T.MUSCLE)
        c.ellipse(0.5, 0.5, 0.24, 0.15, T.BONE)
        c.ellipse(0.5, 0.5, 0.22, 0.13, T.MARROW)
        c.ellipse(0.5, 0.36, 0.07, 0.025, T.CARTILAGE)
        c.poly([(0.38, 0.3), (0.5, 0.33), (0.62, 0.3), (0.58, 0.22), (0.42, 0.22)], T.BONE)
        c.poly([(0.4, 0.29), (0.5, 0.315), (0.6, 0.29), (0.57, 0.235), (0.43, 0.235)], T.MARROW)
        c.ellipse(0.5, 0.75, 0.022, 0.022, T.VESSEL)
        c.ellipse(0.45, 0.77, 0.018, 0.018, T.VESSEL)
        effusions = [(0.5 + s * 0.25, 0.37, 0.03, 0.02) for s in (-1, 1)] + \
                    [(0.5 + s * 0.27, 0.37, 0.08, 0.05) for s in (-1, 1)]
        cyst_at = (0.5 + float(rng.choice((-1.0, 1.0))) * 0.2, 0.77)
    if lesion:
        _knee_lesion(c, lesion, effusions, cyst_at)


def _long_bone(c: _Canvas, shaft, end: tuple[float, float], condyle: float, twin=None, plateau=None) -> None:
    """Dark cortex around bright marrow: a shaft ending in a round condyle (or two) or a tibial plateau."""
    for tissue, grow in ((T.BONE, 0.0), (T.MARROW, -0.015)):
        (x0, y0), (x1, _), (x2, y2) = shaft
        c.poly([(x0 - grow, y0), (x1 + grow, y0), (x2 + grow, y2), (x0 - grow + 0.02, y2)], tissue)
        for cx, cy in (end,) + ((twin,) if twin else ()):
            if condyle:
                c.ellipse(cx, cy, condyle + grow, condyle + grow, tissue)
        if plateau:
            pts = np.asarray(plateau)
            c.poly(pts + np.array([[-grow, -grow], [grow, -grow], [grow, grow], [-grow, grow]]), tissue)


def _knee_lesion(c: _Canvas, lesion: _Lesion, effusions: list, cyst_at: tuple[float, float]) -> None:
    soft = (T.FAT, T.MUSCLE, T.CARTILAGE)
    if lesion.finding == "effusion":
        pockets = effusions[len(effusions) // 2:] if lesion.large else effusions[: len(effusions) // 2]
        for cx, cy, rx, ry in pockets:
            c.ellipse(cx, cy, rx * lesion.rng.uniform(0.9, 1.1), ry * lesion.rng.uniform(0.9, 1.1), T.FLUID,
                      within=soft)
        cx, cy, rx, ry = pockets[0]
        c.mark(cx, cy, 2 * max(rx, ry))
    else:
        _blob(c, lesion, *cyst_at, T.CYST, 0.08, aspect=0.75, within=soft + (T.VESSEL,))


# ----------------------------------------------------------------------------- ultrasound
def _abdomen_us(c: _Canvas, rng: np.random.Generator, view: str, lesion: _Lesion | None) -> None:
    """Curvilinear right-upper-quadrant scan: liver, gallbladder, vessels or kidney."""
    c.sector = (0.5, -0.12, 0.18, 1.06, math.radians(36))
    c.poly([(-0.2, -0.2), (1.2, -0.2), (1.2, 1.2), (-0.2, 1.2)], T.LIVER)
    c.ellipse(0.5, -0.12, 0.33, 0.33, T.MUSCLE)
    c.ellipse(0.5, -0.12, 0.27, 0.27, T.FAT)
    for _ in range(6):
        x, y, r, angle = rng.uniform(0.25, 0.75), rng.uniform(0.3, 0.75), rng.uniform(0.006, 0.013), rng.uniform(0, 3)
        c.ellipse(x, y, r * 2.2 + 0.005, r + 0.005, T.WALL, angle=angle)
        c.ellipse(x, y, r * 2.2, r, T.VESSEL, angle=angle)
    if view == "transverse":
        gallbladder = (0.4, 0.5, 0.12, 0.1, 0.0)
        c.ellipse(0.58, 0.78, 0.045, 0.04, T.VESSEL)
        c.ellipse(0.68, 0.8, 0.035, 0.035, T.VESSEL)
        c.line([(0.45, 0.95), (0.55, 0.9), (0.65, 0.95)], 0.025, T.BONE)
        c.poly([(0.46, 0.97), (0.64, 0.97), (0.7, 1.2), (0.4, 1.2)], 25, layer=1)
        liver_sites = ((0.62, 0.36), (0.7, 0.55))
        label = "TRANS"
    else:
        gallbladder = (0.42, 0.42, 0.19, 0.09, 0.2)
        c.ellipse(0.62, 0.75, 0.17, 0.085, T.KIDNEY, angle=0.15)
        c.ellipse(0.62, 0.75, 0.09, 0.03, T.SINUS, angle=0.15)
        t = np.linspace(0, 1, 10)
        c.line(np.stack([0.2 + 0.6 * t, 0.93 - 0.08 * np.sin(np.pi * t)], 1), 0.015, T.WALL)
        liver_sites = ((0.3, 0.62), (0.66, 0.38))
        label = "LONG"
    gx, gy, grx, gry, gangle = gallbladder
    c.ellipse(gx, gy, grx + 0.008, gry + 0.008, T.WALL, angle=gangle)
    c.ellipse(gx, gy, grx, gry, T.FLUID, angle=gangle)
    _us_labels(c, rng, ("RUQ", "LIVER", "ABD")[int(rng.integers(3))] + " " + label, (3.5, 5.0))
    if lesion:
        if lesion.finding == "stone":
            _us_lesion(c, lesion, gx, gy + gry - lesion.diameter * 0.35)
        else:
            _us_lesion(c, lesion, *liver_sites[int(lesion.rng.integers(len(liver_sites)))])


def _thyroid_us(c: _Canvas, rng: np.random.Generator, view: str, lesion: _Lesion | None) -> None:
    """High-frequency neck scan: both lobes and trachea (transverse) or one lobe (longitudinal)."""
    c.sector = (0.5, -1.2, 1.26, 2.05, math.radians(16))
    c.poly([(-0.2, -0.2), (1.2, -0.2), (1.2, 1.2), (-0.2, 1.2)], T.SOFT)
    c.ellipse(0.5, -1.2, 1.33, 1.33, T.FAT)
    if view == "transverse":
        for s in (-1, 1):
            c.ellipse(0.5 + s * 0.33, 0.26, 0.13, 0.07, T.MUSCLE, angle=s * 0.2)
            c.ellipse(0.5 + s * 0.16, 0.21, 0.11, 0.03, T.MUSCLE)
            c.ellipse(0.5 + s * 0.19, 0.4, 0.13, 0.11, T.THYROID, angle=-s * 0.15)
            c.ellipse(0.5 + s * 0.36, 0.44, 0.045, 0.045, T.WALL)
            c.ellipse(0.5 + s * 0.36, 0.44, 0.04, 0.04, T.VESSEL)
            c.ellipse(0.5 + s * 0.2, 0.68, 0.09, 0.04, T.MUSCLE)
        c.ellipse(0.5, 0.29, 0.11, 0.035, T.THYROID)
        c.ellipse(0.5, 0.42, 0.075, 0.07, T.AIR)
        t = np.linspace(0.0, 1.0, 9)
        c.line(np.stack([0.42 + 0.16 * t, 0.42 - 0.07 * np.sin(np.pi * t)], 1), 0.014, T.WALL)
        c.poly([(0.43, 0.42), (0.57, 0.42), (0.6, 1.2), (0.4, 1.2)], 30, layer=1)
        c.ellipse(0.6, 0.55, 0.03, 0.025, T.MUSCLE)
        lobes = {s: (0.5 + s * 0.19, 0.41) for s in (-1, 1)}
        label = "TRANS"
    else:
        c.ellipse(0.5, 0.2, 0.45, 0.04, T.MUSCLE)
        c.ellipse(0.5, 0.42, _jitter(rng, 0.32, 0.02), 0.12, T.THYROID)
        c.ellipse(0.5, 0.66, 0.45, 0.06, T.MUSCLE)
        lobes = {0: (0.5 + rng.uniform(-0.12, 0.12), 0.42)}
        label = "LONG"
    _us_labels(c, rng, "THYROID " + label, (7.5, 10.0, 12.0))
    if lesion:
        _us_lesion(c, lesion, *lobes[lesion.side if lesion.side in lobes else 0])


def _us_lesion(c: _Canvas, lesion: _Lesion, cx: float, cy: float) -> None:
    """Cyst (anechoic, enhancement behind), stone (bright, shadow behind), mass (echogenic, dark halo), nodule."""
    d = lesion.diameter
    if lesion.finding == "cyst":
        _blob(c, lesion, cx, cy, T.WALL, 0.02, scale=1.06)
        _blob(c, lesion, cx, cy, T.CYST, 0.02)
        _acoustic_band(c, cx, cy, d * 0.8, 175)
    elif lesion.finding == "stone":
        c.ellipse(cx, cy, d / 2, d * 0.32, T.STONE)
        c.mark(cx, cy, d)
        _acoustic_band(c, cx, cy, d * 0.9, 18)
    elif lesion.finding == "mass":
        _blob(c, lesion, cx, cy, T.HALO, 0.3, scale=1.35)
        _blob(c, lesion, cx, cy, T.MASS, 0.3)
    else:
        _blob(c, lesion, cx, cy, T.HALO, 0.05, scale=1.1, aspect=0.8)
        _blob(c, lesion, cx, cy, T.NODULE, 0.05, aspect=0.8)


def _acoustic_band(c: _Canvas, cx: float, cy: float, width: float, gain: int) -> None:
    """Posterior enhancement (gain > 100) or shadow (< 100) along the beam behind a lesion."""
    ax, ay = c.sector[:2]
    far = [(ax + (x - ax) * 4, ay + (cy - ay) * 4) for x in (cx + width / 2, cx - width / 2)]
    c.poly([(cx - width / 2, cy), (cx + width / 2, cy)] + far, gain, layer=1)


def _us_labels(c: _Canvas, rng: np.random.Generator, label: str, frequencies: tuple[float, ...]) -> None:
    c.text(label, rng.uniform(0.03, 0.06), rng.uniform(0.9, 0.93), 0.05)
    c.text(f"{_pick(rng, frequencies)} MHz", 0.76, 0.03, 0.04)


# ----------------------------------------------------------------------------- finishing
_SCENES = {
    ("x-ray", "chest"): _chest_xray,
    ("x-ray", "hand"): _hands_xray,
    ("ct", "head"): _head,
    ("ct", "chest"): _chest_ct,
    ("ct", "abdomen"): _abdomen_ct,
    ("mri", "brain"): _head,
    ("mri", "knee"): _knee_mri,
    ("ultrasound", "abdomen"): _abdomen_us,
    ("ultrasound", "thyroid"): _thyroid_us,
}


def _tissue_image(c: _Canvas, modality: str, rng: np.random.Generator, layer: int = 0) -> np.ndarray:
    """Grey levels from the label layer plus low-frequency texture where the palette asks for it."""
    labels = c.labels(layer)
    mean, amp = _palette(modality, layer)
    image = mean[labels]
    if amp.any():
        image = image + amp[labels] * _smooth_noise(rng, c.size, 12)
    return image


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean unit-ish noise varying over about size/cells pixels."""
    coarse = Image.fromarray(rng.standard_normal((cells, cells), dtype=np.float32), mode="F")
    return np.asarray(coarse.resize((size, size), Image.BICUBIC))


def _blur(image: np.ndarray, radius: float) -> np.ndarray:
    """Box blur of a [0, 1] image (through 8 bits): softens drawn edges like a detector's blur."""
    grey = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    return np.asarray(grey.filter(ImageFilter.BoxBlur(radius)), np.float32) / 255


def _finish_xray(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    image = _tissue_image(c, "x-ray", rng) + _tissue_image(c, "x-ray", rng, layer=1)
    image = _blur(image, c.size / 200)
    yy = np.linspace(-1, 1, c.size, dtype=np.float32)[:, None]
    return image * (1 - 0.08 * yy ** 2) + rng.uniform(0.01, 0.025) * _gaussian(rng, image.shape)


def _gaussian(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal noise of `shape` (..., h, w): random crops and flips of a fixed noise bank (fast)."""
    *lead, h, w = shape
    bank = _noise_bank(max(h, w))
    tiles = []
    for _ in range(int(np.prod(lead, dtype=int))):
        y, x = rng.integers(0, bank.shape[0] - max(h, w), 2)
        step_y, step_x = rng.choice((-1, 1), 2)
        tiles.append(bank[y:y + h, x:x + w][::step_y, ::step_x])
    return np.stack(tiles).reshape(shape)


@lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    return np.random.default_rng(20240601).standard_normal((3 * size, 3 * size), dtype=np.float32)


def _finish_ct(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    body = c.labels() > T.AIR
    image = _blur(_tissue_image(c, "ct", rng), c.size / 256)
    sigma = rng.uniform(0.02, 0.04)
    grain = _gaussian(rng, image.shape) * 0.6 + _smooth_noise(rng, c.size, c.size // 3)
    return image + sigma * grain * np.where(body, 1.0, 0.25)


def _finish_mri(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    image = _blur(_tissue_image(c, "mri", rng), c.size / 256)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-1, 1, c.size, dtype=np.float32)
    image = image * (1 + 0.15 * (math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]))
    sigma = rng.uniform(0.015, 0.035)
    noise = _gaussian(rng, (2,) + image.shape) * sigma
    return np.hypot(image + noise[0], noise[1])


def _finish_us(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    echo = _tissue_image(c, "ultrasound", rng) * (np.asarray(c.layers[1], np.float32) / 100)
    n = c.size
    speckle = np.hypot(*_gaussian(rng, (2, n, (n + 1) // 2)))
    speckle = np.repeat(speckle, 2, axis=1)[:, :n] / 1.25
    depth, inside = _sector_geometry(n, c.sector)
    image = echo * speckle * (1.1 - 0.45 * depth) * rng.uniform(0.85, 1.15)
    return _blur(image, n / 220) * inside


@lru_cache(maxsize=16)
def _sector_geometry(size: int, sector: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Relative depth (0 at the probe) and the inside of the fan, per pixel."""
    ax, ay, r0, r1, half = sector
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    r, theta = np.hypot(xx - ax, yy - ay), np.arctan2(xx - ax, yy - ay)
    inside = (r >= r0) & (r <= r1) & (np.abs(theta) <= half)
    return np.clip((r - r0) / (r1 - r0), 0, 1), inside.astype(np.float32)


_FINISH = {"x-ray": _finish_xray, "ct": _finish_ct, "mri": _finish_mri, "ultrasound": _finish_us}
_JITTER = {"x-ray": {}, "ct": {}, "mri": {}, "ultrasound": {"shift": 0.02, "rotate_deg": 0.0, "fills": (0, 100)}}


def _to_8bit(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """8-bit image with window/level jitter (gamma, contrast, brightness) applied through a lookup table."""
    levels = np.linspace(0, 1, 256) ** rng.uniform(0.85, 1.15) * rng.uniform(0.88, 1.12) + rng.uniform(-0.05, 0.05)
    lut = (np.clip(levels, 0, 1) * 255).round().astype(np.uint8)
    return lut[(np.clip(image, 0, 1) * 255).astype(np.uint8)]


@lru_cache(maxsize=32)
def _font(pixels: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(6, pixels))


def _overlay(image: np.ndarray, c: _Canvas, arrow: bool) -> np.ndarray:
    """The 8-bit image with burnt-in annotations and, if asked, an arrow at the lesion."""
    grey = Image.fromarray(image)
    draw = ImageDraw.Draw(grey)
    for text, x, y, height in c.texts:
        draw.text((x * c.size, y * c.size), text, fill=235, font=_font(round(height * c.size)))
    if arrow and c.marks:
        _arrow(draw, *c.marks[0], c.size)
    return np.asarray(grey)


def _arrow(draw: ImageDraw.ImageDraw, x: float, y: float, radius: float, size: int) -> None:
    """A white arrow coming in from outside and above, its head just short of the lesion."""
    direction = np.array([1.0 if x >= size / 2 else -1.0, -0.8])
    direction /= np.linalg.norm(direction)
    head = np.array([x, y]) + direction * (radius + 0.02 * size)
    tail = head + direction * 0.11 * size
    normal = np.array([-direction[1], direction[0]])
    wing = head + direction * 0.045 * size
    draw.line([tuple(tail), tuple(wing)], fill=250, width=max(1, round(0.012 * size)))
    draw.polygon([tuple(head), tuple(wing + normal * 0.025 * size), tuple(wing - normal * 0.025 * size)], fill=250)


def render_example(fields: Mapping[str, str | None], seed: int | Sequence[int], size: int = 256,
                   arrow: bool | None = None) -> tuple[np.ndarray, str]:
    """Draw `fields` as a size x size uint8 greyscale image and caption it; deterministic in `seed`.

    Anatomy, lesion, noise and caption use separate random streams, so the same seed with finding
    "none" gives the same image without the lesion. `arrow` forces the pointer arrow (and the
    caption's "(arrow)") on or off; by default 30% of findings get one.
    """
    entropy = [int(seed)] if np.isscalar(seed) else [int(x) for x in seed]
    caption_rng, anatomy_rng, lesion_rng, style_rng = (np.random.default_rng(entropy + [k]) for k in range(1, 5))
    modality, finding = fields["modality"], fields["finding"]
    drawn = caption_rng.random() < ARROW_PROBABILITY if arrow is None else arrow
    arrow = finding != "none" and drawn
    caption = compose_caption(fields, caption_rng, arrow=arrow)
    canvas = _Canvas(size, anatomy_rng, **_JITTER[modality])
    lesion = None
    if finding != "none":
        lesion = _Lesion(finding, _SIDE.get(fields["laterality"], 0), fields["size"], lesion_rng)
    _SCENES[(modality, fields["region"])](canvas, anatomy_rng, fields["view"], lesion)
    image = _to_8bit(_FINISH[modality](canvas, style_rng), style_rng)
    return _overlay(image, canvas, arrow), caption


def contact_sheet(fields_list: Sequence[Mapping], seed: int = 0, size: int = 256, columns: int = 4) -> np.ndarray:
    """Examples side by side (row-major) in one uint8 image."""
    tiles = [render_example(fields, (seed, i), size)[0] for i, fields in enumerate(fields_list)]
    rows = -(-len(tiles) // columns)
    sheet = np.zeros((rows * (size + 4), columns * (size + 4)), np.uint8)
    for i, tile in enumerate(tiles):
        r, col = divmod(i, columns)
        sheet[r * (size + 4): r * (size + 4) + size, col * (size + 4): col * (size + 4) + size] = tile
    return sheet


def example_fields(n: int = 16, seed: int = 0) -> list[dict[str, str | None]]:
    """`n` random field sets cycling through every modality and region (for contact sheets)."""
    rng, studies = np.random.default_rng(seed), list(VIEWS_BY_STUDY)
    chosen = []
    while len(chosen) < n:
        fields = sample_fields(rng)
        if (fields["modality"], fields["region"]) == studies[len(chosen) % len(studies)]:
            chosen.append(fields)
    return chosen


# ----------------------------------------------------------------------------- dataset files
def _params(n_train: int, n_valid: int, n_test: int, image_size: int, seed: int) -> dict:
    return {"n_train": n_train, "n_valid": n_valid, "n_test": n_test, "image_size": image_size, "seed": seed,
            "version": GENERATOR_VERSION}


def image_id(split: str, index: int) -> str:
    """'SYNTH_train_000001' for the first training image."""
    return f"SYNTH_{split}_{index + 1:06d}"


def _render_chunk(job: tuple[str, int, int, int, int, str]) -> tuple[str, list[tuple[str, str, dict]]]:
    """Render and save images [start, stop) of one split; returns the split and its (ID, caption, fields) rows."""
    split, start, stop, seed, size, folder = job
    rows = []
    for index in range(start, stop):
        entropy = (seed, _SPLIT_CODES[split], index)
        fields = sample_fields(np.random.default_rng(list(entropy) + [0]))
        image, caption = render_example(fields, entropy, size)
        name = image_id(split, index)
        Image.fromarray(image).save(Path(folder) / split / f"{name}.png", compress_type=2)  # zlib Huffman-only: fast
        rows.append((name, caption, fields))
    return split, rows


# The default split sizes (train.py's default run). 16,000 training images since 2026-12-05 (8,000 before): the
# small presets' weakest study, abdominal CT, then has 1,406 images instead of 702, and a classifier of that study
# alone needed thousands (benchmarks/field_ceiling.py). Measured: the CNN-GRU's default runs on it 96.7%, 96.9%, 97.0%
# all fields (its best); GIT small 93.1% against 90.3% in a paired 12.7-min run (4 + 1 epochs against 8 + 3, one
# seed), 90.6% (3 + 2), 93.2% (4 + 1; 1 captioner epoch planned since) and 97.6% (8 + 1, its deeper stem) in
# default runs (README "Status", `benchmarks/default_runs.md`).
DEFAULT_SPLIT_SIZES = {"n_train": 16000, "n_valid": 1000, "n_test": 1000}


def generate_dataset(out_dir: str | Path, n_train: int = DEFAULT_SPLIT_SIZES["n_train"],
                     n_valid: int = DEFAULT_SPLIT_SIZES["n_valid"], n_test: int = DEFAULT_SPLIT_SIZES["n_test"],
                     image_size: int = 256, seed: int = 0, workers: int | None = None) -> Path:
    """Render the dataset into `out_dir` (replacing an earlier synthetic one there); returns the folder."""
    out = Path(out_dir)
    _check_replaceable(out)
    _remove_stale_temporaries(out)
    params = _params(n_train, n_valid, n_test, image_size, seed)
    counts = dict(zip(SPLITS, (n_train, n_valid, n_test)))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        for split in SPLITS:
            (tmp / split).mkdir(parents=True)
        started = time.perf_counter()
        rows, workers = _render_all(tmp, counts, seed, image_size, workers)
        seconds = time.perf_counter() - started
        for split in SPLITS:
            _write_split(tmp, split, rows[split])
        _write_metadata(tmp, params, counts, seconds)
        sheet = contact_sheet(example_fields(16, seed), seed, min(image_size, 256))
        Image.fromarray(sheet).save(tmp / "examples.png")
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left after a failure
    total = sum(counts.values())
    print(f"Rendered {total} images at {image_size} px in {seconds:.1f} s ({total / max(seconds, 1e-9):.0f} img/s) "
          f"with {workers} worker(s) -> {out}")
    return out


def _render_all(folder: Path, counts: dict[str, int], seed: int, size: int, workers: int | None
                ) -> tuple[dict[str, list], int]:
    """Render every split in chunks of 50 with a progress bar; rows per split sorted by ID, and the workers used."""
    jobs = [(split, start, min(start + 50, n), seed, size, str(folder))
            for split, n in counts.items() for start in range(0, n, 50)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    rows: dict[str, list] = {split: [] for split in SPLITS}
    with tqdm(total=sum(counts.values()), unit="img", desc="synthetic") as bar:
        for split, done in _map(jobs, workers):
            rows[split].extend(done)
            bar.update(len(done))
    return {split: sorted(r) for split, r in rows.items()}, workers


def _map(jobs: list, workers: int) -> Iterator[tuple[str, list]]:
    """Run the chunks in a spawned pool (safe when TensorFlow is already loaded), or inline for one worker."""
    if workers == 1:
        yield from map(_render_chunk, jobs)
        return
    with get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(_render_chunk, jobs)


def _write_split(folder: Path, split: str, rows: list[tuple[str, str, dict]]) -> None:
    with open(folder / f"{split}_captions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "Caption"])
        writer.writerows((name, caption) for name, caption, _ in rows)
    with open(folder / f"{split}_findings.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", *FIELDS])
        writer.writerows([name] + [fields[k] or "" for k in FIELDS] for name, _, fields in rows)


def _write_metadata(folder: Path, params: dict, counts: dict, seconds: float) -> None:
    meta = {"name": "medcap-synthetic", "params": params, "counts": counts, "fields": list(FIELDS),
            "vocabulary": {"modalities": MODALITIES, "regions_by_modality": REGIONS_BY_MODALITY,
                           "findings_by_region": FINDINGS_BY_REGION},
            "generation_seconds": round(seconds, 2)}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(
        "# medcap synthetic radiology dataset\n\n"
        f"Generated by `python -m pipelines.synthetic` (version {GENERATOR_VERSION}, seed {params['seed']}, "
        f"{params['image_size']} px greyscale PNG): "
        + ", ".join(f"{n} {split}" for split, n in counts.items()) + " images.\n\n"
        "Layout as ROCOv2: `{split}/{ID}.png` and `{split}_captions.csv` (`ID,Caption`). "
        "`{split}_findings.csv` holds the true fields (" + ", ".join(FIELDS) + "); an empty cell means none.\n"
        "Every caption is determined by what is drawn; laterality follows radiological convention "
        "(the patient's right on the image's left). `examples.png` shows 16 examples.\n"
        "Fully synthetic: no patient data.\n",
        encoding="utf-8",
    )


def _check_replaceable(out: Path) -> None:
    """Refuse to overwrite a non-empty folder that is not a synthetic dataset."""
    if out.exists() and any(out.iterdir()) and not (out / "dataset.json").is_file():
        raise FileExistsError(f"{out} exists and is not a synthetic dataset; choose another --out.")


def _remove_stale_temporaries(out: Path) -> None:
    """Delete folders that killed runs left beside `out` (their process is gone)."""
    for path in out.parent.glob(f".{out.name}.*-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by the finished `tmp` with renames, so no half-written dataset is ever visible."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def ensure_dataset(out_dir: str | Path, workers: int | None = None, **params) -> Path:
    """The dataset in `out_dir`, generated only if missing or made with other parameters."""
    out = Path(out_dir)
    wanted = _params(**{**_default_params(), **params})
    try:
        existing = json.loads((out / "dataset.json").read_text(encoding="utf-8"))["params"]
    except (OSError, ValueError, KeyError):
        existing = None
    if existing == wanted and all((out / f"{split}_captions.csv").is_file() for split in SPLITS):
        return out
    return generate_dataset(out, workers=workers, **{k: v for k, v in wanted.items() if k != "version"})


def _default_params() -> dict:
    return {**DEFAULT_SPLIT_SIZES, "image_size": 256, "seed": 0}


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: generate (or reuse) the synthetic dataset."""
    defaults = _default_params()
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.synthetic",
        description="Render the synthetic radiology captioning dataset (ROCOv2 layout). "
                    "Reuses OUT when it already holds a dataset made with the same parameters.",
    )
    parser.add_argument("--out", required=True, help="output folder, e.g. data/synthetic")
    parser.add_argument("--train", type=int, default=defaults["n_train"], help="training images (default %(default)s)")
    parser.add_argument("--valid", type=int, default=defaults["n_valid"], help="validation images (default %(default)s)")
    parser.add_argument("--test", type=int, default=defaults["n_test"], help="test images (default %(default)s)")
    parser.add_argument("--size", type=int, default=defaults["image_size"], help="image side in pixels (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults["seed"], help="random seed (default %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPU cores)")
    parser.add_argument("--force", action="store_true", help="regenerate even if OUT is up to date")
    args = parser.parse_args(argv)
    params = {"n_train": args.train, "n_valid": args.valid, "n_test": args.test, "image_size": args.size,
              "seed": args.seed}
    if args.force:
        return generate_dataset(args.out, workers=args.workers, **params)
    out = ensure_dataset(args.out, workers=args.workers, **params)
    print(f"Dataset ready in {out}")
    return out


if __name__ == "__main__":
    main()
