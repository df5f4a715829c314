"""The shapes world: scenes of coloured shapes on a plain background, their renders and their captions.

Everything the shapes model, its checker and its tokenizer know comes from the closed vocabulary defined here.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

from imagic_lite.errors import InputError

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 135, 25),
    "yellow": (240, 215, 35),
    "green": (40, 160, 60),
    "blue": (40, 85, 215),
    "purple": (140, 55, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
DEFAULT_BACKGROUND = "gray"
SIZES = ("small", "big")
# Half the side of a shape's bounding box, as a fraction of the image side.
HALF_EXTENT = {"small": 0.10, "big": 0.18}
# Grid positions as (row, column) with 0 = top/left, 1 = middle, 2 = bottom/right.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
GRID_CENTRES = (0.24, 0.5, 0.76)
MAX_JITTER = 0.03  # largest random offset of a shape's centre, as a fraction of the image side
MAX_SCALE_JITTER = 0.05

# Ways to say each kind of position; {p} is the position's name.
_CORNER_PHRASES = ("at the {p}", "in the {p}", "in the {p} corner")
_EDGE_PHRASES = {"top": ("at the top",), "bottom": ("at the bottom",), "left": ("on the left", "at the left"),
                 "right": ("on the right", "at the right")}
_CENTRE_PHRASES = ("in the center", "in the middle", "at the center")

GRAMMAR_WORDS = ("a", "an", "at", "in", "on", "the", "corner", "middle", "there", "is", "and", "background")
# Every word a caption can contain; the tokenizer gives each one its own token.
VOCABULARY: tuple[str, ...] = tuple(sorted(
    set(SHAPES) | set(COLOURS) | set(BACKGROUNDS) | set(SIZES) | set(GRAMMAR_WORDS)
    | {word for name in POSITIONS for word in name.split()}
))


@dataclass(frozen=True)
class Thing:
    """One shape of a scene: what it is and where, plus the small random offset that keeps renders varied."""

    shape: str
    colour: str
    size: str = "big"
    position: str = "center"
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("colour", self.colour, COLOURS)
        _check_choice("size", self.size, SIZES)
        _check_choice("position", self.position, POSITIONS)

    def box(self) -> tuple[float, float, float, float]:
        """Bounding box (left, top, right, bottom) as fractions of the image side."""
        row, col = POSITIONS[self.position]
        cx, cy = GRID_CENTRES[col] + self.dx, GRID_CENTRES[row] + self.dy
        half = HALF_EXTENT[self.size] * self.scale
        return cx - half, cy - half, cx + half, cy + half


@dataclass(frozen=True)
class Scene:
    """A main shape on a plain background, optionally with a second, separate shape."""

    shape: str
    colour: str
    size: str = "big"
    position: str = "center"
    background: str = DEFAULT_BACKGROUND
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    second: Thing | None = None

    def __post_init__(self) -> None:
        _check_choice("background", self.background, BACKGROUNDS)
        _ = self.main  # building the main Thing validates its fields

    @property
    def main(self) -> Thing:
        return Thing(self.shape, self.colour, self.size, self.position, self.dx, self.dy, self.scale)

    @property
    def things(self) -> tuple[Thing, ...]:
        return (self.main,) if self.second is None else (self.main, self.second)


def _check_choice(field: str, value: str, choices) -> None:
    if value not in choices:
        raise InputError(f"unknown {field} {value!r} (the shapes world knows: {', '.join(choices)})")


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene as an RGB image, 4x supersampled so edges are antialiased like a photo's."""
    if size < 16:
        raise InputError(f"render size must be at least 16 pixels, got {size}")
    big = size * 4
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for thing in scene.things:
        left, top, right, bottom = (v * big for v in thing.box())
        fill = COLOURS[thing.colour]
        if thing.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif thing.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:  # an upright triangle whose bounding box is the same square as the other shapes'
            draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)


def _random_thing(rng: random.Random, position: str | None = None) -> Thing:
    return Thing(
        shape=rng.choice(SHAPES),
        colour=rng.choice(tuple(COLOURS)),
        size=rng.choice(SIZES),
        position=position or rng.choice(tuple(POSITIONS)),
        dx=rng.uniform(-MAX_JITTER, MAX_JITTER),
        dy=rng.uniform(-MAX_JITTER, MAX_JITTER),
        scale=rng.uniform(1 - MAX_SCALE_JITTER, 1 + MAX_SCALE_JITTER),
    )


def _apart(a: Thing, b: Thing, margin: float = 0.03) -> bool:
    """True when the two boxes, grown by `margin`, do not touch: the checker must see two objects."""
    al, at, ar, ab = a.box()
    bl, bt, br, bb = b.box()
    return al - margin > br or bl - margin > ar or at - margin > bb or bt - margin > ab


def random_scene(rng: random.Random, p_second: float = 0.0, p_background: float = 0.3) -> Scene:
    """A uniformly random scene; `p_background` is the chance of a non-gray background."""
    main = _random_thing(rng)
    background = DEFAULT_BACKGROUND
    if rng.random() < p_background:
        background = rng.choice([name for name in BACKGROUNDS if name != DEFAULT_BACKGROUND])
    second = None
    if rng.random() < p_second:
        # A big shape in the centre leaves no room: after a few tries the scene keeps one shape.
        candidates = (_random_thing(rng) for _ in range(50))
        second = next((c for c in candidates if c.position != main.position and _apart(main, c)), None)
    return Scene(main.shape, main.colour, main.size, main.position, background, main.dx, main.dy, main.scale,
                 second)


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _position_phrase(position: str, rng: random.Random) -> str:
    if position == "center":
        return rng.choice(_CENTRE_PHRASES)
    if position in _EDGE_PHRASES:
        return rng.choice(_EDGE_PHRASES[position])
    return rng.choice(_CORNER_PHRASES).format(p=position)


def _noun_phrase(thing: Thing, with_size: bool) -> str:
    words = ([thing.size] if with_size else []) + [thing.colour, thing.shape]
    return " ".join([_article(words[0])] + words)


def caption(scene: Scene, rng: random.Random, p_size: float = 1.0, p_position: float = 1.0,
            p_background: float | None = None, p_there_is: float = 0.0) -> str:
    """Describe the scene; each optional attribute is named with its probability, colour and shape always.

    `p_background` defaults to always naming a non-gray background and never the gray one. `p_there_is` is the
    chance of the word order "at the top there is a red circle" instead of "a red circle at the top".
    """
    if p_background is None:
        p_background = 0.0 if scene.background == DEFAULT_BACKGROUND else 1.0
    parts = []
    for thing in scene.things:
        noun = _noun_phrase(thing, rng.random() < p_size)
        position = _position_phrase(thing.position, rng) if rng.random() < p_position else ""
        if position and scene.second is None and rng.random() < p_there_is:
            parts.append(f"{position} there is {noun}")
        else:
            parts.append(f"{noun} {position}".strip())
    text = " and ".join(parts)
    if rng.random() < p_background:
        text += f" on {_article(scene.background)} {scene.background} background"
    return text


def full_caption(scene: Scene) -> str:
    """The canonical caption that names every attribute, e.g. for benchmarks and examples."""
    return caption(scene, random.Random(0), p_background=1.0)


_BACKGROUND_PHRASE = re.compile(r"\bon an? (\w+) background\b")


def parse_caption(text: str) -> dict:
    """The attributes a caption names: shape, colour, size, position, background, and `second` (a dict) if any.

    Words outside the world's vocabulary raise InputError so benchmarks never score a caption nobody can read.
    """
    words = re.sub(r"[,.!]", " ", text.lower()).split()
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        raise InputError(f"the shapes world does not know the word(s) {', '.join(map(repr, unknown))}")
    text = " ".join(words)
    result: dict = {}
    match = _BACKGROUND_PHRASE.search(text)
    if match:
        _check_choice("background", match.group(1), BACKGROUNDS)
        result["background"] = match.group(1)
        text = text[: match.start()] + text[match.end():]
    things = [_parse_thing(part.split()) for part in text.split(" and ")]
    result.update(things[0])
    if len(things) > 1:
        result["second"] = things[1]
    return result


def _parse_thing(words: list[str]) -> dict:
    found: dict = {}
    for word in words:
        for field, choices in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES)):
            if word in choices:
                found[field] = word
    vertical = next((w for w in words if w in ("top", "bottom")), None)
    horizontal = next((w for w in words if w in ("left", "right")), None)
    if vertical or horizontal:
        found["position"] = " ".join(w for w in (vertical, horizontal) if w)
    elif "center" in words or "middle" in words:
        found["position"] = "center"
    return found
