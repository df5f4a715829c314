"""Auto-eta: the judge's sign on the tiny and shapes models, LoRA switched off for it, a seeded search that
reproduces, and `--auto-eta` on `run` and on its bundle with `edit` choosing alike."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from test_cli import FAST, assert_one_line_error, invoke

from imagic_lite.config import EmbedSettings, SampleSettings
from imagic_lite.eta import AutoEtaSettings, base_judge, choose_eta, diffusion_judge, knee, pick
from imagic_lite.images import read_png_params, to_tensor
from imagic_lite.imagic import Sample, generate, optimize_embedding
from imagic_lite.lora import add_lora, has_lora
from imagic_lite.models import encode, encode_text, load_components


def _load(model):
    from imagic_lite.config import MemorySettings

    return load_components(str(model), MemorySettings(weights="fp32", offload_encoders=False), torch.device("cpu"))


def _margins(c, images, e_tgt, e_opt) -> list[float]:
    judge, _, _ = diffusion_judge(c, e_tgt, e_opt, AutoEtaSettings())
    return [s["alignment"] for s in judge([Sample(1.0, 0, im) for im in images])]


def test_tiny_judge_ranks_the_reconstruction_below_the_edit(tiny_sd):
    """Random weights know no words, so the 'edit' is made real: e_tgt is fitted to image B as e_opt is to the
    input A. The judge must then score A (an exact reconstruction) below B."""
    from PIL import Image, ImageDraw

    c = _load(tiny_sd)
    photo, edit = Image.new("RGB", (64, 64), (128, 128, 128)), Image.new("RGB", (64, 64), (20, 20, 200))
    ImageDraw.Draw(photo).ellipse((16, 16, 48, 48), fill=(220, 30, 30))
    fit = EmbedSettings(steps=8, lr=1e-1, noise_draws=2)
    e_tgt, e_opt = (optimize_embedding(c, encode(c, to_tensor(im), "a photo").latent, encode_text(c, "a photo")[0],
                                       fit)[0] for im in (edit, photo))
    reconstruction, edited = _margins(c, [photo, edit], e_tgt, e_opt)
    assert reconstruction < edited


def test_shapes_judge_ranks_the_reconstruction_below_the_edit():
    """The shipped shapes model as its own judge: a red circle asked to be a blue square. e_opt stands in as the
    input's own caption (what stage A's embedding reconstructs); the edit is the rendered target scene."""
    from imagic_lite.models import shapes_dir
    from imagic_lite.shapes import world

    c = _load(shapes_dir())
    source = world.Scene("circle", "red", "big", "center", "gray")
    target = replace(source, shape="square", colour="blue")
    e_tgt, e_opt = encode_text(c, world.full_caption(target))[0], encode_text(c, world.full_caption(source))[0]
    reconstruction, edited = _margins(c, [world.render(source), world.render(target)], e_tgt, e_opt)
    assert reconstruction < 0 < edited


def test_base_judge_switches_the_lora_off_and_back_on(tiny_sd):
    c = _load(tiny_sd)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    cond = torch.randn(1, 77, c.unet.config.cross_attention_dim)
    plain = c.unet(x, t, encoder_hidden_states=cond).sample
    add_lora(c.unet, {"r": 4, "lora_alpha": 4.0, "target_modules": ["to_q", "to_v"]})
    with torch.no_grad():
        for name, p in c.unet.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)  # a trained adapter: B is no longer zero
    tuned = c.unet(x, t, encoder_hidden_states=cond).sample
    with base_judge(c) as what:
        judged = c.unet(x, t, encoder_hidden_states=cond).sample
    assert what == "base" and has_lora(c.unet)
    assert torch.equal(judged, plain) and not torch.allclose(tuned, plain)
    assert torch.equal(c.unet(x, t, encoder_hidden_states=cond).sample, tuned)


def test_knee_takes_the_smallest_eta_past_the_fraction():
    scores = {0.0: {"alignment": -2.0}, 0.6: {"alignment": -1.8}, 0.8: {"alignment": 0.5},
              1.0: {"alignment": 1.2}, 1.2: {"alignment": 1.4}}
    assert knee(scores, 0.8) == (1.0, pytest.approx(0.72))
    assert knee(scores, 0.5)[0] == 0.8
    flat = {0.0: {"alignment": 1.0}, 0.6: {"alignment": 0.2}, 0.8: {"alignment": 0.1}}
    assert knee(flat, 0.8)[0] == 0.6  # nothing moved toward the target: the least changed image


def test_pick_steps_one_tried_eta_past_the_judges_flip():
    scores = {0.0: {"alignment": -2.0}, 0.6: {"alignment": -1.8}, 0.8: {"alignment": 0.5},
              1.0: {"alignment": 1.2}, 1.2: {"alignment": 1.4}}
    settings = AutoEtaSettings()
    eta, why = pick(scores, settings, decides=True)
    assert eta == 1.0 and "eta 0.8 is the first" in why and "1 tried eta(s) further" in why
    assert pick(scores, AutoEtaSettings(past=0), decides=True)[0] == 0.8
    assert pick(scores, AutoEtaSettings(past=5), decides=True)[0] == 1.2  # never past the largest tried
    # no natural zero (CLIP), or nothing judged past it: the knee (0.75 of the way: threshold 0.55 -> 1.0), then a step
    assert pick(scores, settings, decides=False)[0] == 1.2
    below = {e: {"alignment": s["alignment"] - 10} for e, s in scores.items()}
    eta, why = pick(below, settings, decides=True)
    assert eta == 1.2 and why.startswith("no tried eta is judged closer")


def test_search_is_deterministic_for_a_seed(tiny_sd):
    c = _load(tiny_sd)
    e_tgt, uncond = encode_text(c, "a dog")[0], encode_text(c, "")[0]
    e_opt = _shifted(e_tgt)
    sample = SampleSettings(steps=2, guidance=3.0, etas=(0.5, 1.0, 1.5), seeds=(0,), batch=3)
    settings = AutoEtaSettings()
    choices = []
    for _ in range(2):
        samples = generate(c, e_tgt, e_opt, uncond, sample, 64, 64)
        judge, name, calls = diffusion_judge(c, e_tgt, e_opt, settings)
        choices.append(choose_eta(c, e_tgt, e_opt, uncond, sample, 64, 64, samples, judge, calls, name, settings))
    assert choices[0] == choices[1]
    assert set(choices[0].scores) == {0.0, 0.5, 1.0, 1.5} and choices[0].eta in (0.5, 1.0, 1.5)
    # the search's own cost: eta 0's render (uncond + cond per step) and 2 conds x 3 timesteps x 2 noises per image
    assert choices[0].unet_calls == 2 * 2 + 4 * 12
    other = AutoEtaSettings(seed=1)
    judge, name, calls = diffusion_judge(c, e_tgt, e_opt, other)
    moved = choose_eta(c, e_tgt, e_opt, uncond, sample, 64, 64, samples, judge, calls, name, other)
    assert moved.scores != choices[0].scores  # the seed is what fixes the judge's noise


def _shifted(cond):
    from imagic_lite.models import Cond

    return Cond(cond.embeds + 0.5 * torch.randn(cond.embeds.shape, generator=torch.Generator().manual_seed(3)))


def test_auto_eta_run_then_edit_choose_alike(tiny_models, photo, tmp_path, capsys):
    """`run --auto-eta` records the choice in run.json and the PNGs; `edit --auto-eta` on its bundle repeats it."""
    model = tiny_models["sd"]
    out, edited = tmp_path / "run", tmp_path / "edit"
    code, _, err = invoke(capsys, "run", photo, "a dog lying down", "--model", model, "--out", out,
                          "--etas", "0.5,1.0,1.5", *FAST, "--auto-eta")
    assert code == 0, err
    first = json.loads((out / "run.json").read_text())["auto_eta"]
    assert first["eta"] in (0.5, 1.0, 1.5) and set(first["scores"]) == {"0", "0.5", "1", "1.5"}
    assert "base model (LoRA off)" in first["judge"] and first["reason"]
    stages = [s["stage"] for s in json.loads((out / "run.json").read_text())["stages"]]
    assert stages[-2:] == ["C", "eta"]
    params = read_png_params(next(out.glob(f"*_eta{first['eta']:.2f}_seed0.png")))
    assert params["auto_eta"] == first["eta"] and params["auto_eta_chosen"] == 1
    assert json.loads(params["auto_eta_scores"]) == first["scores"]
    code, _, err = invoke(capsys, "edit", out / f"{photo.stem}.imagic.safetensors", "--model", model, "--out", edited,
                          "--quiet", "--auto-eta")
    assert code == 0, err
    again = json.loads((edited / "run.json").read_text())["auto_eta"]
    assert again["eta"] == first["eta"]
    flat = {eta: s["alignment"] for eta, s in first["scores"].items()}
    assert {eta: s["alignment"] for eta, s in again["scores"].items()} == pytest.approx(flat, rel=1e-4)


def test_auto_eta_clip_plumbing(tiny_sd, tmp_path):
    """A tiny random CLIP: only that clip:PATH loads, scores every eta and chooses one (its choice means nothing)."""
    from tiny import _tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from imagic_lite.api import Imagic

    config = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                     "num_hidden_layers": 1, "vocab_size": 514, "bos_token_id": 512,
                                     "eos_token_id": 513, "pad_token_id": 513},
                        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                       "num_hidden_layers": 1, "image_size": 32, "patch_size": 8},
                        projection_dim=8)
    folder = tmp_path / "clip"
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=_tokenizer())
    processor.save_pretrained(folder)
    imagic = Imagic.from_pretrained(str(tiny_sd), "cpu", overrides={"embed": {"steps": 2}, "tune": {"steps": 2}})
    from PIL import Image

    imagic.fit(Image.new("RGB", (64, 64), (200, 40, 40)), "a dog")
    sample = SampleSettings(steps=2, etas=(0.5, 1.0), seeds=(0,))
    samples = imagic.generate(sample=sample, auto_eta=f"clip:{folder}")
    choice = imagic.eta_choice
    assert choice.judge.startswith("clip") and set(choice.scores) == {0.0, 0.5, 1.0}
    assert [s.chosen for s in samples].count(True) == 1 and choice.eta in (0.5, 1.0)
    assert imagic.report()["auto_eta"]["eta"] == choice.eta


@pytest.mark.parametrize("value, fragment", [("sharp", "--auto-eta takes"),
                                             ("clip:/no/such/folder", "no such folder")])
def test_bad_auto_eta_is_one_line(photo, tmp_path, capsys, value, fragment):
    code, _, err = invoke(capsys, "run", photo, "a dog", "--out", tmp_path / "o", "--auto-eta", value)
    assert_one_line_error(code, err, 2, fragment)
