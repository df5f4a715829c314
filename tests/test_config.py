"""Presets and settings: every shipped preset loads, bad TOML names file/key/line, --vram picks sensibly."""

from __future__ import annotations

import pytest

from imagic_lite.config import (
    EmbedSettings,
    Preset,
    SampleSettings,
    TuneSettings,
    all_presets,
    apply_overrides,
    load_preset,
    preset_for_vram,
)
from imagic_lite.errors import ConfigError

REQUIRED = {"4gb", "6gb", "8gb", "12gb", "24gb", "cpu", "paper"}


def test_every_shipped_preset_loads_and_required_ones_exist():
    presets = {p.name: p for p in all_presets()}
    assert set(presets) >= REQUIRED
    for p in presets.values():
        assert p.description, f"{p.name} needs a description"
    assert presets["paper"].tune.mode == "full" and presets["paper"].memory.weights == "fp32"
    assert presets["paper"].memory.checkpointing is False and presets["paper"].tune.optimizer == "adamw"
    assert presets["4gb"].memory.storage == "fp8" and presets["4gb"].memory.checkpointing
    assert presets["cpu"].vram_gb is None and presets["paper"].vram_gb is None


@pytest.mark.parametrize(("gb", "expected"), [(4, "4gb"), (5.5, "4gb"), (6, "6gb"), (8, "8gb"), (11, "8gb"),
                                               (12, "12gb"), (16, "12gb"), (24, "24gb"), (80, "24gb")])
def test_vram_picks_the_fastest_preset_that_fits(gb, expected):
    assert preset_for_vram(gb).name == expected


def test_vram_below_smallest_preset_is_a_clear_error():
    with pytest.raises(ConfigError, match="below the smallest preset"):
        preset_for_vram(2)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*8gb"):
        load_preset("huge")


def test_malformed_toml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[tune]\nsteps = 10\nrank = = 4\n')
    with pytest.raises(ConfigError, match=r"bad.toml: invalid TOML.*line 3"):
        load_preset(str(bad))


def test_unknown_key_names_file_key_and_line(tmp_path):
    bad = tmp_path / "typo.toml"
    bad.write_text('format_version = 1\n\n[tune]\nsteps = 10\nlearning_rate = 1e-4\n')
    with pytest.raises(ConfigError, match=r"typo.toml, key 'tune.learning_rate', line 5: unknown key"):
        load_preset(str(bad))


def test_wrong_type_and_out_of_range_values(tmp_path):
    bad = tmp_path / "t.toml"
    bad.write_text('[embed]\nsteps = "many"\n')
    with pytest.raises(ConfigError, match=r"key 'embed.steps', line 2: expected an integer"):
        load_preset(str(bad))
    bad.write_text('[sample]\nguidance = -3\n')
    with pytest.raises(ConfigError, match="sample.guidance must be 0..50"):
        load_preset(str(bad))


def test_overrides_layer_in_order():
    base = load_preset("8gb")
    out = apply_overrides(base, {"tune": {"steps": 7}, "sample": {"etas": [0.5, 1.0]}}, "flags")
    assert out.tune.steps == 7 and out.sample.etas == (0.5, 1.0)
    assert out.memory == base.memory  # untouched sections keep the preset's values


@pytest.mark.parametrize("bad", [
    lambda: EmbedSettings(steps=-1), lambda: EmbedSettings(lr=0), lambda: TuneSettings(mode="half"),
    lambda: TuneSettings(rank=0), lambda: SampleSettings(etas=()), lambda: SampleSettings(etas=(9.0,)),
    lambda: SampleSettings(seeds=(-1,)), lambda: SampleSettings(steps=0),
])
def test_settings_validate_ranges(bad):
    with pytest.raises(ConfigError):
        bad()


def test_preset_roundtrips_to_dict():
    d = Preset().to_dict()
    assert set(d) == {"name", "description", "vram_gb", "embed", "tune", "sample", "memory"}


def test_family_sections_adjust_presets_for_sdxl():
    p = load_preset("8gb")
    assert p.memory.storage == "none"
    xl = p.for_family("sdxl")
    assert xl.memory.storage == "nf4" and xl.memory.checkpointing and xl.tune.optimizer == "adamw8bit"
    assert p.for_family("sd") == p
    assert load_preset("12gb").for_family("sdxl").memory.checkpointing


def test_family_section_is_validated_at_load(tmp_path):
    bad = tmp_path / "x.toml"
    bad.write_text("[sdxl.memory]\nstorage = 'nf5'\n")
    with pytest.raises(ConfigError, match="memory.storage must be one of"):
        load_preset(str(bad))
    bad.write_text("[sdxl.wat]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"\[sdxl\.\*\] may only hold"):
        load_preset(str(bad))


def test_family_tables_merge_instead_of_replacing():
    """A second [sdxl.memory] table (a later layer) adds keys; it must not drop the preset's checkpointing."""
    p = apply_overrides(load_preset("8gb"), {"sdxl": {"memory": {"storage": "fp8"}, "tune": {"rank": 8}}}, "x")
    xl = p.for_family("sdxl")
    assert xl.memory.storage == "fp8" and xl.memory.checkpointing and xl.tune.rank == 8
    assert xl.tune.optimizer == "adamw8bit" and not xl.family  # a resolved preset carries no family tables


@pytest.mark.parametrize(("text", "fragment"), [
    ('[sample]\netas = ["a"]\n', "key 'sample.etas', line 2, item 1: expected a number, got 'a'"),
    ("[sample]\nseeds = [0, 1.5]\n", "key 'sample.seeds', line 2, item 2: expected an integer, got 1.5"),
    ("[tune]\ntargets = [1, 2]\n", "key 'tune.targets', line 2, item 1: expected a string, got 1"),
    ("[sample]\netas = [true]\n", "item 1: expected a number, got True"),
    ('[sdxl.tune]\ntargets = ["to_q", 3]\n', "item 2: expected a string, got 3"),
])
def test_list_elements_are_type_checked(tmp_path, text, fragment):
    path = tmp_path / "lists.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_preset(str(path))
    assert fragment in str(info.value) and "lists.toml" in str(info.value)


def test_full_mode_over_quantized_storage_is_refused_when_resolved(tmp_path):
    from imagic_lite.api import resolve_settings

    with pytest.raises(ConfigError, match="tune.mode = 'full'.*memory.storage = 'fp8'"):
        resolve_settings(tmp_path, load_preset("4gb"), None, {"tune": {"mode": "full"}}, family="sd")
    with pytest.raises(ConfigError, match="memory.storage = 'nf4'"):  # 8gb stores SDXL in NF4
        resolve_settings(tmp_path, load_preset("8gb"), None, {"tune": {"mode": "full"}}, family="sdxl")
    # a later layer may repair an earlier one: only the final settings are judged
    fixed = tmp_path / "fix.toml"
    fixed.write_text('[tune]\nmode = "full"\n[memory]\nstorage = "none"\n')
    assert resolve_settings(tmp_path, load_preset("4gb"), str(fixed), {}, family="sd").tune.mode == "full"
