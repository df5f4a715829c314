"""Tests for the edit-quality benchmark's harness: the suite's composition and the scoring rules, on clean renders
and on hand-made checker readings (no model runs here)."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from imagic_lite.shapes import checker, world

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


suite = _load("quality_suite")
quality = _load("quality")


def _thing_reading(thing: world.Thing, **changes) -> checker.ObjectReading:
    """What a perfect checker would read for `thing`, with some fields changed."""
    box = thing.box()
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    reading = checker.ObjectReading(thing.colour, thing.shape, thing.size, thing.position, centre, box, 0.05,
                                    world.COLOURS[thing.colour], 0.01)
    return replace(reading, **changes)


def _reading(scene: world.Scene, *objects: checker.ObjectReading) -> checker.Reading:
    return checker.Reading(scene.background, world.BACKGROUNDS[scene.background], list(objects))


def _shift(box, dx):
    return (box[0] + dx, box[1], box[2] + dx, box[3])


def test_suite_has_at_least_40_cases_of_every_kind():
    cases = suite.build_suite()
    assert len(cases) >= 40
    for kind in suite.KINDS:
        assert sum(c.kind == kind for c in cases) >= 8, kind
    assert len({c.id for c in cases}) == len(cases)
    assert suite.build_suite() == cases  # deterministic
    assert suite.build_suite(1) != cases  # held-out suites differ


def test_every_case_changes_exactly_what_it_says():
    for case in suite.build_suite():
        differs = {f for f in ("shape", "colour", "size", "position", "background")
                   if getattr(case.source, f) != getattr(case.target, f)}
        assert differs == set(case.change), case.id
        assert case.source.second == case.target.second
        assert not set(case.change) & set(case.keep)
        parsed = world.parse_caption(case.prompt)  # the prompt is in the model's language and names the target
        for f in ("shape", "colour", "size", "position"):
            assert parsed[f] == getattr(case.target, f), case.id
        if case.kind == "second-object":
            assert {"second.colour", "second.shape", "second.centre"} <= set(case.keep)
            assert parsed["second"]["colour"] == case.target.second.colour


def test_subset_covers_every_kind():
    cases = suite.build_suite()
    chosen = suite.subset(cases, 12)
    assert len(chosen) == 12
    assert {c.kind for c in chosen} == set(suite.KINDS)
    assert suite.subset(cases, 1000) == tuple(sorted(cases, key=lambda c: (int(c.id[-2:]),
                                                                         suite.KINDS.index(c.kind))))


@pytest.mark.parametrize("seed", [0, 1])
def test_clean_renders_score_as_expected(seed):
    """The target's own render is a perfect edit; the unedited input keeps everything but succeeds at nothing."""
    for case in suite.build_suite(seed):
        edited = suite.score(case, checker.read(world.render(case.target)))
        assert edited.success and edited.preserved, (case.id, edited)
        unedited = suite.score(case, checker.read(world.render(case.source)))
        assert not unedited.success and unedited.preserved, (case.id, unedited)


def _case(kind: str) -> suite.EditCase:
    return next(c for c in suite.build_suite() if c.kind == kind)


def test_colour_edit_scoring_on_hand_made_readings():
    case = _case("colour")
    target = case.target.main
    good = _reading(case.target, _thing_reading(target))
    assert suite.score(case, good).success and suite.score(case, good).preserved
    # The centre may move up to the tolerance, not beyond.
    near = _thing_reading(target, box=_shift(target.box(), suite.CENTRE_TOLERANCE * 0.9))
    far = _thing_reading(target, box=_shift(target.box(), suite.CENTRE_TOLERANCE * 1.1))
    assert suite.score(case, _reading(case.target, near)).preserved
    moved = suite.score(case, _reading(case.target, far))
    assert moved.success and not moved.preserved and moved.kept["centre"] is False
    # The right colour on the wrong shape: success, not preserved.
    other_shape = next(s for s in world.SHAPES if s != target.shape)
    wrong = suite.score(case, _reading(case.target, _thing_reading(target, shape=other_shape)))
    assert wrong.success and not wrong.preserved and wrong.kept["shape"] is False
    # An extra speck of an object, or a changed background, breaks preservation.
    extra = _thing_reading(world.Thing("square", "green", "small", "top left"))
    assert not suite.score(case, _reading(case.target, _thing_reading(target), extra)).preserved
    other_bg = next(b for b in world.BACKGROUNDS if b != case.source.background)
    assert not suite.score(case, _reading(replace(case.target, background=other_bg), _thing_reading(target))).preserved
    # Nothing found at all: neither.
    empty = suite.score(case, _reading(case.target))
    assert not empty.success and not empty.preserved and empty.objects == 0


def test_second_object_must_stay():
    case = _case("second-object")
    main, second = case.target.main, case.target.second
    perfect = _reading(case.target, _thing_reading(main), _thing_reading(second))
    assert suite.score(case, perfect).success and suite.score(case, perfect).preserved
    # Reading order does not matter: objects are matched by where they should be.
    swapped = _reading(case.target, _thing_reading(second), _thing_reading(main))
    assert suite.score(case, swapped).preserved
    recoloured = next(c for c in world.COLOURS if c != second.colour)
    leaked = suite.score(case, _reading(case.target, _thing_reading(main), _thing_reading(second, colour=recoloured)))
    assert leaked.success and not leaked.preserved and leaked.kept["second.colour"] is False
    vanished = suite.score(case, _reading(case.target, _thing_reading(main)))
    assert vanished.success and not vanished.preserved and vanished.kept["count"] is False


def test_position_edit_is_judged_where_the_target_puts_it():
    case = _case("position")
    moved = _reading(case.target, _thing_reading(case.target.main))
    assert suite.score(case, moved).success and suite.score(case, moved).preserved
    stayed = suite.score(case, _reading(case.source, _thing_reading(case.source.main)))
    assert not stayed.success and stayed.preserved
    copied = suite.score(case, _reading(case.target, _thing_reading(case.target.main),
                                        _thing_reading(case.source.main)))
    assert copied.success and not copied.preserved  # a copy at the new place is not a move


def _result(flags: dict[float, tuple[bool, bool]], kind: str = "colour") -> quality.CaseResult:
    samples = [{"setting": "eta", "value": v, "seed": 0, "reading": {}, "png": b"",
                "score": {"success": s, "preserved": p, "changed": {}, "kept": {}, "objects": 1}}
               for v, (s, p) in flags.items()]
    return quality.CaseResult("c", kind, "lora", "p", {"A": 1.0, "B": 2.0, "C": 1.0}, {"A": 10, "B": 20}, {},
                              samples)


def test_best_value_prefers_a_full_edit_then_success_then_the_default():
    assert quality.best_value(_result({0.8: (True, False), 1.0: (False, True), 1.2: (True, True)}), 1.0) == 1.2
    assert quality.best_value(_result({0.8: (True, False), 1.0: (False, True)}), 1.0) == 0.8
    assert quality.best_value(_result({0.8: (False, True), 1.0: (False, True), 1.2: (False, True)}), 1.0) == 1.0


def test_summary_rates_at_best_and_default():
    results = [_result({1.0: (True, True), 1.2: (True, True)}),
               _result({1.0: (False, True), 1.2: (True, True)}, kind="shape"),
               _result({1.0: (True, False), 1.2: (False, True)}, kind="size"),
               _result({1.0: (False, False), 1.2: (False, False)}, kind="size")]
    s = quality.summarise(results, 1.0)
    assert s["cases"] == 4
    assert s["best"]["both"] == 0.5 and s["best"]["success"] == 0.75 and s["best"]["preserved"] == 0.5
    assert s["default"] == {"success": 0.5, "preserved": 0.5, "both": 0.25, "value": 1.0}
    assert s["per_value"]["1.2"]["both"] == 0.5
    assert s["by_kind_at_best"]["size"]["cases"] == 2
    assert s["seconds_per_case"] == 4.0 and s["fit_seconds_per_case"] == 3.0


def test_overrides_parse_toml_values():
    data = quality.overrides_from(["tune.steps=200", "tune.targets=['to_q', 'conv1']", "sample.guidance=4.5"], False)
    assert data == {"tune": {"steps": 200, "targets": ["to_q", "conv1"]}, "sample": {"guidance": 4.5}}
    assert quality.overrides_from([], True)["embed"]["steps"] == 3


def test_select_filters_by_case_id_and_kind():
    cases = suite.build_suite(0, 2)
    assert quality.select(cases, "", "") == cases
    picked = quality.select(cases, "size-01,second-object-00", "")
    assert [c.id for c in picked] == ["size-01", "second-object-00"]
    assert {c.kind for c in quality.select(cases, "", "colour,position")} == {"colour", "position"}
    assert [c.id for c in quality.select(cases, "size-01,colour-00", "size")] == ["size-01"]
    with pytest.raises(SystemExit, match="no such case or kind"):
        quality.select(cases, "size-99", "")
    with pytest.raises(SystemExit, match="no such case or kind"):
        quality.select(cases, "", "hue")
