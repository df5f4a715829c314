"""The edit-quality suite and its scoring: shapes-world edit cases (input scene, target text, what must change and
what must stay) and the rules that turn a checker reading of an edited image into success and preservation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from imagic_lite.shapes import world
from imagic_lite.shapes.checker import ObjectReading, Reading

KINDS = ("colour", "shape", "size", "position", "second-object")
CASES_PER_KIND = 8
# A kept object's centre (centre of the checker's fitted box: where the renderer put the shape, for every shape,
# unlike the centroid of mass, which sits low in a triangle) may move this far, as a fraction of the image side
# (0.08 = about 5 px of 64; grid cells are 0.33 wide, so a kept centre never changes the grid cell).
CENTRE_TOLERANCE = 0.08
# Two-object scenes put the objects two grid cells apart in a row or column, so even two big shapes never touch.
FAR_PAIRS = (("left", "right"), ("top", "bottom"), ("top left", "bottom right"), ("top right", "bottom left"),
             ("top left", "top right"), ("bottom left", "bottom right"), ("top left", "bottom left"),
             ("top right", "bottom right"), ("left", "top right"), ("right", "bottom left"))
# Single-object kinds: the attribute that changes, and the values it can take.
SINGLE_KINDS = {"colour": tuple(world.COLOURS), "shape": world.SHAPES, "size": world.SIZES,
                "position": tuple(world.POSITIONS)}
KEPT_MAIN = ("colour", "shape", "size", "centre")  # the main object's attributes an edit may have to keep
SECOND_ATTRIBUTES = ("second.colour", "second.shape", "second.size", "second.centre")


@dataclass(frozen=True)
class EditCase:
    """One edit: render `source`, ask for `prompt` (the caption of `target`), check `change` moved to the target's
    values and `keep` stayed at the source's."""

    id: str
    kind: str
    source: world.Scene
    target: world.Scene
    prompt: str
    change: tuple[str, ...]
    keep: tuple[str, ...]


@dataclass(frozen=True)
class Score:
    """How one edited image did: each asked change and each kept attribute, and the two verdicts."""

    success: bool  # every attribute in `change` reads as the target's
    preserved: bool  # every attribute in `keep` reads as the source's
    changed: dict[str, bool]
    kept: dict[str, bool]
    objects: int


def _other(rng: random.Random, choices, current: str) -> str:
    return rng.choice([c for c in choices if c != current])


def _background(rng: random.Random) -> str:
    # The shapes model saw a non-gray background in 30 % of its training captions; the suite has about as many.
    if rng.random() < 0.7:
        return world.DEFAULT_BACKGROUND
    return rng.choice([b for b in world.BACKGROUNDS if b != world.DEFAULT_BACKGROUND])


def _single(rng: random.Random) -> world.Scene:
    return world.Scene(rng.choice(world.SHAPES), rng.choice(tuple(world.COLOURS)), rng.choice(world.SIZES),
                       rng.choice(tuple(world.POSITIONS)), _background(rng))


def _pair(rng: random.Random) -> world.Scene:
    first, second = rng.choice(FAR_PAIRS)
    if rng.random() < 0.5:
        first, second = second, first
    main_colour = rng.choice(tuple(world.COLOURS))
    other = world.Thing(rng.choice(world.SHAPES), _other(rng, world.COLOURS, main_colour), rng.choice(world.SIZES),
                        second)
    return world.Scene(rng.choice(world.SHAPES), main_colour, rng.choice(world.SIZES), first, _background(rng),
                       second=other)


def build_suite(seed: int = 0, per_kind: int = CASES_PER_KIND) -> tuple[EditCase, ...]:
    """`per_kind` cases of every kind, drawn from `seed` (seed 0 is the benchmark; other seeds give held-out suites
    for tuning settings, so the benchmark's own cases never choose them)."""
    rng = random.Random(seed)
    cases: list[EditCase] = []
    for kind in KINDS:
        for index in range(per_kind):
            if kind in SINGLE_KINDS:
                source = _single(rng)
                target = replace(source, **{kind: _other(rng, SINGLE_KINDS[kind], getattr(source, kind))})
                # A position edit moves the centre on purpose; every other edit must keep it.
                kept_main = tuple(a for a in KEPT_MAIN if a != kind and not (kind == "position" and a == "centre"))
                change, keep = (kind,), (*kept_main, "background", "count")
            else:  # second-object: edit the main object's colour or shape, leave the other object alone
                source = _pair(rng)
                field = "colour" if index % 2 == 0 else "shape"
                choices = world.COLOURS if field == "colour" else world.SHAPES
                new = _other(rng, [c for c in choices if c != source.second.colour or field != "colour"],
                             getattr(source, field))
                target = replace(source, **{field: new})
                kept_main = tuple(a for a in KEPT_MAIN if a != field)
                change, keep = (field,), (*kept_main, *SECOND_ATTRIBUTES, "background", "count")
            prompt = world.caption(target, random.Random(seed * 1000 + len(cases)))
            cases.append(EditCase(f"{kind}-{index:02d}", kind, source, target, prompt, change, keep))
    return tuple(cases)


def subset(cases: tuple[EditCase, ...], n: int) -> tuple[EditCase, ...]:
    """The first `n` cases taken round-robin over the kinds, so any subset covers every kind it can."""
    by_kind = {kind: [c for c in cases if c.kind == kind] for kind in KINDS}
    chosen: list[EditCase] = []
    depth = 0
    while len(chosen) < min(n, len(cases)):
        for kind in KINDS:
            if depth < len(by_kind[kind]) and len(chosen) < n:
                chosen.append(by_kind[kind][depth])
        depth += 1
    return tuple(chosen)


def _centre(box: tuple[float, float, float, float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _distance(a: tuple[float, float], b: tuple[float, float]) -> float:
    return ((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5


def _match(reading: Reading, expected: tuple[world.Thing, ...]) -> list[ObjectReading | None]:
    """Pair each expected thing (main first) with the unclaimed object whose box centre is nearest to where it
    should be; None when the image has too few objects."""
    free = list(reading.objects)
    matched: list[ObjectReading | None] = []
    for thing in expected:
        if not free:
            matched.append(None)
            continue
        nearest = min(free, key=lambda o: _distance(_centre(o.box), _centre(thing.box())))
        free.remove(nearest)
        matched.append(nearest)
    return matched


def _attribute(found: ObjectReading | None, thing: world.Thing, name: str) -> bool:
    """Whether the found object has `thing`'s value of one attribute (the centre: within CENTRE_TOLERANCE)."""
    if found is None:
        return False
    if name == "centre":
        return bool(_distance(_centre(found.box), _centre(thing.box())) <= CENTRE_TOLERANCE)
    return bool(getattr(found, name) == getattr(thing, name))


def score(case: EditCase, reading: Reading) -> Score:
    """Success and preservation of one edited image, from its checker reading.

    Objects are matched to where the target puts them. Changes compare with the target, kept attributes with the
    source; `count` asks for the source's number of objects (nothing vanished, nothing spawned)."""
    matched = _match(reading, case.target.things)
    found = {"main": matched[0], "second": matched[1] if len(matched) > 1 else None}

    def check(name: str, scene: world.Scene) -> bool:
        if name == "background":
            return bool(reading.background == scene.background)
        if name == "count":
            return bool(len(reading.objects) == len(scene.things))
        which, attribute = name.split(".") if "." in name else ("main", name)
        thing = scene.main if which == "main" else scene.second
        return _attribute(found[which], thing, attribute)

    changed = {name: check(name, case.target) for name in case.change}
    kept = {name: check(name, case.source) for name in case.keep}
    return Score(all(changed.values()), all(kept.values()), changed, kept, len(reading.objects))
