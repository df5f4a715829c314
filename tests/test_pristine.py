"""One Imagic object reused across photos (issue 16 defect 5, and what `batch` relies on): every fit and every
bundle applied starts from the pristine base UNet, so the results equal those of a freshly loaded model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from imagic_lite.api import Imagic

STEPS = {"embed": {"steps": 2}, "sample": {"steps": 2, "etas": [0.7]}}
LORA = {**STEPS, "tune": {"steps": 3, "lora_lr": 1e-2}}
FULL = {**STEPS, "tune": {"steps": 2, "mode": "full", "full_lr": 1e-3}}


def _second_photo(folder):
    image = Image.new("RGB", (64, 64), (40, 90, 200))
    ImageDraw.Draw(image).rectangle((10, 20, 50, 44), fill=(250, 240, 20))
    path = folder / "second.png"
    image.save(path)
    return path


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _pixels(imagic: Imagic, bundle=None) -> bytes:
    return b"".join(s.image.tobytes() for s in imagic.generate(bundle))


@pytest.fixture(scope="module")
def fresh_lora(tiny_sd, tmp_path_factory):
    """A LoRA fit of the second photo on a freshly loaded model: the reference both tests compare against."""
    path = _second_photo(tmp_path_factory.mktemp("fresh"))
    imagic = Imagic.from_pretrained(str(tiny_sd), "cpu", overrides=LORA)
    bundle = imagic.fit(path, "a cat", seed=1)
    return path, bundle, _pixels(imagic), imagic


def _check_second_fit(reused: Imagic, path, reference, reference_model: Imagic) -> None:
    again = reused.fit(path, "a cat", seed=1)  # LoRA: used to raise "Adapter with name default already exists"
    assert torch.equal(again.e_opt.embeds, reference.e_opt.embeds)  # stage A saw the base, not the first tuning
    assert _same(again.weights, reference.weights)
    dtypes = {n: p.dtype for n, p in reused.components.unet.named_parameters()}
    assert dtypes == {n: p.dtype for n, p in reference_model.components.unet.named_parameters()}


@pytest.mark.slow  # the default suite covers it too: test_batch's resumed job b equals b fitted second in a batch
def test_second_lora_fit_equals_a_fit_on_a_fresh_model(tiny_sd, photo, fresh_lora):
    path, reference, pixels, reference_model = fresh_lora
    reused = Imagic.from_pretrained(str(tiny_sd), "cpu", overrides=LORA)
    reused.fit(photo, "a dog")
    _check_second_fit(reused, path, reference, reference_model)
    assert _pixels(reused) == pixels


def test_full_fits_and_bundles_start_from_the_base(tiny_sd, photo, fresh_lora):
    path, lora_bundle, lora_pixels, _ = fresh_lora
    reference_model = Imagic.from_pretrained(str(tiny_sd), "cpu", overrides=FULL)
    reference = reference_model.fit(path, "a cat", seed=1)
    reused = Imagic.from_pretrained(str(tiny_sd), "cpu", overrides=FULL)
    reused.fit(photo, "a dog")
    _check_second_fit(reused, path, reference, reference_model)  # used to train on the first photo's weights
    full_pixels = _pixels(reused)
    assert full_pixels == _pixels(reference_model)
    assert _pixels(reused, lora_bundle) == lora_pixels  # used to stack the LoRA on the fully tuned base
    assert _pixels(reused, reference) == full_pixels  # and back: the full bundle on the restored base
