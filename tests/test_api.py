"""The Python API: fit/generate, and an interruption in stage B resumed to exactly the uninterrupted result."""

from __future__ import annotations

import pytest
import torch

from imagic_lite.api import Imagic
from imagic_lite.errors import Interrupted
from imagic_lite.imagic import StopFlag

OVERRIDES = {"embed": {"steps": 4}, "tune": {"steps": 6, "lora_lr": 1e-2}, "sample": {"steps": 2, "etas": [0.7]}}


def _imagic(model) -> Imagic:
    return Imagic.from_pretrained(str(model), "cpu", overrides=OVERRIDES)


def test_fit_then_generate(tiny_sd, photo):
    imagic = _imagic(tiny_sd)
    bundle = imagic.fit(photo, "a dog")
    assert bundle.mode == "lora" and bundle.lora["r"] == 4
    samples = imagic.generate()
    assert len(samples) == 1 and samples[0].image.size == (72, 56)
    stages = [r.stage for r in imagic.records]
    assert stages == ["load", "encode", "A", "B", "C"]
    assert imagic.report()["preset"]["tune"]["steps"] == 6


def test_stage_b_interrupt_and_resume_equals_uninterrupted(tiny_sd, photo, tmp_path):
    whole = _imagic(tiny_sd).fit(photo, "a dog", seed=3)

    stop = StopFlag()

    def progress(event):
        if event["stage"] == "B" and event["step"] == 2:
            stop.set()

    checkpoint = tmp_path / "ckpt.safetensors"
    with pytest.raises(Interrupted, match="--resume"):
        _imagic(tiny_sd).fit(photo, "a dog", seed=3, progress=progress, stop=stop, checkpoint=checkpoint)
    assert checkpoint.is_file()
    resumed = _imagic(tiny_sd).fit(photo, "a dog", seed=3, checkpoint=checkpoint, resume=True)
    assert torch.equal(resumed.e_opt.embeds, whole.e_opt.embeds)
    assert resumed.weights.keys() == whole.weights.keys()
    assert all(torch.equal(resumed.weights[k], whole.weights[k]) for k in whole.weights)


def test_resume_refuses_a_checkpoint_from_another_run(tiny_sd, photo, tmp_path):
    from imagic_lite.errors import InputError

    stop = StopFlag()
    stop.set()
    checkpoint = tmp_path / "ckpt.safetensors"
    with pytest.raises(Interrupted):
        _imagic(tiny_sd).fit(photo, "a dog", stop=stop, checkpoint=checkpoint)
    with pytest.raises(InputError, match="different image, prompt"):
        _imagic(tiny_sd).fit(photo, "a cat", checkpoint=checkpoint, resume=True)


def test_stage_loss_ends_are_means_over_a_tenth_of_the_steps():
    from imagic_lite.api import _ends

    assert _ends([]) == (None, None)
    assert _ends([3.0]) == (3.0, 3.0)
    losses = [float(i % 2) for i in range(100)]  # alternating 0, 1: each single end value would mislead
    assert _ends(losses) == (0.5, 0.5)
    assert _ends([4.0] * 10 + [1.0] * 80 + [2.0] * 10) == (4.0, 2.0)


def test_family_tables_of_every_layer_apply_after_that_layer(tiny_models, tmp_path):
    """[sdxl.*] in the model's imagic-lite.toml and in --config count (they were dropped), merged key by key;
    a later layer's plain key still beats an earlier layer's family table."""
    from imagic_lite.api import resolve_settings
    from imagic_lite.config import load_preset

    model = tmp_path / "model"
    model.mkdir()
    (model / "imagic-lite.toml").write_text("[sdxl.tune]\nrank = 8\nalpha = 8.0\n")
    config = tmp_path / "mine.toml"
    config.write_text('[sdxl.memory]\nstorage = "fp8"\n')
    xl = resolve_settings(model, load_preset("8gb"), str(config), {}, family="sdxl")
    assert xl.memory.storage == "fp8" and xl.memory.checkpointing  # the preset's [sdxl.memory] key kept
    assert xl.tune.rank == 8 and xl.tune.optimizer == "adamw8bit"
    sd = resolve_settings(model, load_preset("8gb"), str(config), {}, family="sd")
    assert sd.memory.storage == "none" and sd.tune.rank == 4
    assert resolve_settings(model, load_preset("8gb"), str(config), {"tune": {"rank": 2}},
                            family="sdxl").tune.rank == 2  # flags beat the model's [sdxl.tune]
    config.write_text('[memory]\nstorage = "none"\n')  # beats the preset's [sdxl.memory] storage = "nf4"
    assert resolve_settings(model, load_preset("8gb"), str(config), {}, family="sdxl").memory.storage == "none"
    config.write_text('[sdxl.memory]\nstorage = "fp8"\n')  # the family is read from the model folder
    assert resolve_settings(tiny_models["sdxl"], load_preset("cpu"), str(config), {}).memory.storage == "fp8"


def test_tune_lr_sets_the_rate_of_the_final_mode(tmp_path):
    from imagic_lite.api import resolve_settings
    from imagic_lite.config import load_preset

    paper = resolve_settings(tmp_path, load_preset("paper"), None, {}, family="sd", tune_lr=1e-6)
    assert paper.tune.mode == "full" and paper.tune.full_lr == 1e-6 and paper.tune.lr == 1e-6
    config = tmp_path / "full.toml"
    config.write_text('[tune]\nmode = "full"\n')
    full = resolve_settings(tmp_path, load_preset("cpu"), str(config), {}, family="sd", tune_lr=3e-6)
    assert full.tune.lr == 3e-6 and full.tune.lora_lr == load_preset("cpu").tune.lora_lr
    flags = resolve_settings(tmp_path, load_preset("paper"), None, {"tune": {"mode": "lora"}}, family="sd",
                             tune_lr=2e-4)
    assert flags.tune.lr == 2e-4 and flags.tune.full_lr == load_preset("paper").tune.full_lr
