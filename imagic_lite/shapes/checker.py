"""Reads a shapes-world image back into attributes from its pixels: background, then each object's colour,
shape, size and position, largest object first. Built to tolerate the blur and noise of model samples."""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from imagic_lite.errors import InputError

from .world import BACKGROUNDS, COLOURS, HALF_EXTENT, SHAPES

# Colour distance from the background above which a pixel counts as part of an object (RGB, 0-255).
OBJECT_THRESHOLD = 45.0
# Components smaller than this fraction of the image are specks of noise, not objects.
MIN_AREA = 0.006
# Between the small and big bounding-box sides (0.2 and 0.36 of the image side).
SIZE_SPLIT = HALF_EXTENT["small"] + HALF_EXTENT["big"]
# Area of each shape as a fraction of its square bounding box.
AREA_OF_UNIT_BOX = {"square": 1.0, "circle": float(np.pi / 4), "triangle": 0.5}
# Gaussian blurs (in pixels) tried when matching an object against each clean shape.
BLURS = (0.0, 0.6, 1.0, 1.4, 1.8)
_ROWS = ("top", "", "bottom")
_COLUMNS = ("left", "", "right")


@dataclass
class ObjectReading:
    """One object found in the image; fractions are of the image side, centroid is (x, y) in [0, 1]."""

    colour: str
    shape: str
    size: str
    position: str
    centroid: tuple[float, float]
    box: tuple[float, float, float, float]
    area: float
    rgb: tuple[int, int, int]
    fit_error: float  # mean absolute coverage error of the best shape fit: large means "not a clean shape"


@dataclass
class Reading:
    """Everything read from one image; `objects` is sorted largest first and may be empty."""

    background: str
    background_rgb: tuple[int, int, int]
    objects: list[ObjectReading] = field(default_factory=list)

    @property
    def main(self) -> ObjectReading | None:
        return self.objects[0] if self.objects else None

    def to_dict(self) -> dict:
        return asdict(self)


def to_array(image) -> np.ndarray:
    """An HxWx3 float array in 0-255 from a PIL image, a uint8 array, or a float array in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 3 or array.shape[2] != 3:
        raise InputError(f"expected an HxWx3 RGB image, got an array of shape {array.shape}")
    if np.issubdtype(np.asarray(image).dtype, np.floating) and array.max() <= 1.0 + 1e-6:
        array = array * 255.0
    return array


def nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.sum((rgb - np.asarray(palette[name])) ** 2)))


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an array of (row, col) indices, largest first."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    found = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    queue.append((nr, nc))
        found.append(np.asarray(pixels))
    return sorted(found, key=len, reverse=True)


def grid_position(x: float, y: float) -> str:
    """Name of the 3x3 grid cell holding (x, y), e.g. "top left", "right", "center"."""
    row = _ROWS[min(int(y * 3), 2)]
    column = _COLUMNS[min(int(x * 3), 2)]
    return " ".join(w for w in (row, column) if w) or "center"


def read(image) -> Reading:
    """Read the background and every object of a shapes-world image (any size, square or not)."""
    pixels = to_array(image)
    height, width, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background_rgb, axis=2)
    reading = Reading(nearest(background_rgb, BACKGROUNDS), tuple(int(v) for v in background_rgb))
    found = [c for c in components(distance > OBJECT_THRESHOLD) if len(c) >= MIN_AREA * height * width]
    labels = np.full((height, width), -1)
    for index, component in enumerate(found):
        labels[component[:, 0], component[:, 1]] = index
    for index, component in enumerate(found):
        others = (labels >= 0) & (labels != index)
        thing = _read_object(pixels, distance, component, background_rgb, others)
        if thing is not None:
            reading.objects.append(thing)
    reading.objects.sort(key=lambda o: o.area, reverse=True)
    return reading


def _read_object(pixels: np.ndarray, distance: np.ndarray, component: np.ndarray, background_rgb: np.ndarray,
                 others: np.ndarray) -> ObjectReading | None:
    """Measure one component: colour from its most distinct pixels, then fit each clean shape to its coverage.

    Mass and centroid of the coverage survive blur and zero-mean noise, so each shape hypothesis gets its box from
    them (sub-pixel), and the shape whose (blurred) render fits the observed coverage best wins.
    """
    height, width, _ = pixels.shape
    rows, cols = component[:, 0], component[:, 1]
    strongest = distance[rows, cols] >= np.quantile(distance[rows, cols], 0.5)
    rgb = np.median(pixels[rows[strongest], cols[strongest]], axis=0)
    # Coverage: how far each pixel has moved from the background towards the object's colour.
    direction = rgb - background_rgb
    if float(direction @ direction) < OBJECT_THRESHOLD**2:
        return None
    coverage = ((pixels - background_rgb) @ direction) / float(direction @ direction)
    coverage[others] = 0.0
    pad = 4
    r0, r1 = max(rows.min() - pad, 0), min(rows.max() + pad + 1, height)
    c0, c1 = max(cols.min() - pad, 0), min(cols.max() + pad + 1, width)
    cover = coverage[r0:r1, c0:c1]
    mass = float(cover.sum())
    if mass < 4:
        return None
    cy = float((cover.sum(axis=1) * (np.arange(r1 - r0) + 0.5)).sum()) / mass
    cx = float((cover.sum(axis=0) * (np.arange(c1 - c0) + 0.5)).sum()) / mass
    observed = np.clip(cover, 0.0, 1.0)
    fits = {}
    for shape in SHAPES:
        side = float(np.sqrt(mass / AREA_OF_UNIT_BOX[shape]))
        top = cy - side * (2 / 3 if shape == "triangle" else 1 / 2)
        box = (cx - side / 2, top, cx + side / 2, top + side)
        error = min(float(np.abs(_model_coverage(shape, box, cover.shape, blur) - observed).mean()) for blur in BLURS)
        fits[shape] = (error, box)
    shape = min(fits, key=lambda name: fits[name][0])
    left, top, right, bottom = fits[shape][1]
    box = ((c0 + left) / width, (r0 + top) / height, (c0 + right) / width, (r0 + bottom) / height)
    side = max(box[2] - box[0], box[3] - box[1])
    # The grid cell comes from the box centre: a triangle's centroid sits low in its box.
    position = grid_position((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    return ObjectReading(
        colour=nearest(rgb, COLOURS),
        shape=shape,
        size="big" if side > SIZE_SPLIT else "small",
        position=position,
        centroid=((c0 + cx) / width, (r0 + cy) / height),
        box=box,
        area=mass / (height * width),
        rgb=tuple(int(v) for v in rgb),
        fit_error=fits[shape][0],
    )


def _model_coverage(shape: str, box: tuple[float, float, float, float], window: tuple[int, int],
                    blur: float) -> np.ndarray:
    """Coverage a clean `shape` filling pixel `box` (left, top, right, bottom) would have after a Gaussian blur."""
    scale = 4
    canvas = Image.new("L", (window[1] * scale, window[0] * scale), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = (v * scale for v in box)
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=255)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=255)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=255)
    small = canvas.resize((window[1], window[0]), Image.Resampling.BOX)
    if blur > 0:
        small = small.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(small, dtype=np.float64) / 255.0
