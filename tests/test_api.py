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
