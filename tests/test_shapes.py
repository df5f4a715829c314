"""Tests for the shapes world, its pixel checker, its tokenizer and the shipped shapes model."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import ImageFilter

from imagic_lite.errors import InputError
from imagic_lite.shapes import MODEL_DIR, TOKENIZER_DIR, checker, world

FIELDS = ("shape", "colour", "size", "position")


def _nearest_reading(reading: checker.Reading, thing: world.Thing) -> checker.ObjectReading:
    """The detected object whose box centre is closest to where `thing` was drawn."""
    left, top, right, bottom = thing.box()
    centre = np.asarray([(left + right) / 2, (top + bottom) / 2])
    return min(reading.objects,
               key=lambda o: float(np.sum((np.asarray([(o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2])
                                           - centre) ** 2)))


def test_checker_reads_clean_renders():
    rng = random.Random(0)
    for _ in range(150):
        scene = world.random_scene(rng)
        reading = checker.read(world.render(scene))
        assert reading.background == scene.background
        assert len(reading.objects) == 1
        found = reading.main
        assert {f: getattr(found, f) for f in FIELDS} == {f: getattr(scene, f) for f in FIELDS}, scene


def test_checker_reads_every_combination_at_the_grid_centres():
    for shape in world.SHAPES:
        for colour in world.COLOURS:
            for size in world.SIZES:
                for position in world.POSITIONS:
                    found = checker.read(world.render(world.Scene(shape, colour, size, position))).main
                    assert (found.shape, found.colour, found.size, found.position) == (shape, colour, size, position)


def test_checker_reads_two_objects_largest_first():
    rng = random.Random(1)
    seen = 0
    while seen < 40:
        scene = world.random_scene(rng, p_second=1.0)
        if scene.second is None:
            continue
        seen += 1
        reading = checker.read(world.render(scene))
        assert len(reading.objects) == 2
        assert reading.objects[0].area >= reading.objects[1].area
        for thing in scene.things:
            found = _nearest_reading(reading, thing)
            assert {f: getattr(found, f) for f in FIELDS} == {f: getattr(thing, f) for f in FIELDS}, scene


def test_checker_tolerates_blur_and_noise():
    rng, noise = random.Random(2), np.random.default_rng(2)
    errors = 0
    for _ in range(100):
        scene = world.random_scene(rng)
        image = world.render(scene).filter(ImageFilter.GaussianBlur(1.2))
        pixels = np.clip(np.asarray(image, dtype=np.float64) + noise.normal(0, 10, (64, 64, 3)), 0, 255)
        found = checker.read(pixels.astype(np.uint8)).main
        errors += found is None or any(getattr(found, f) != getattr(scene, f) for f in FIELDS)
    assert errors <= 2


def test_checker_accepts_float_arrays_and_larger_images():
    scene = world.Scene("triangle", "yellow", "small", "top right", background="black")
    reading = checker.read(np.asarray(world.render(scene, 128), dtype=np.float32) / 255.0)
    assert (reading.background, reading.main.shape, reading.main.position) == ("black", "triangle", "top right")
    assert 0.66 < reading.main.centroid[0] < 1.0 and 0.0 < reading.main.centroid[1] < 0.33


def test_checker_sees_no_object_on_a_blank_image():
    assert checker.read(np.full((64, 64, 3), 128, dtype=np.uint8)).objects == []


def test_render_size_and_mode():
    image = world.render(world.Scene("circle", "red"), 96)
    assert image.size == (96, 96) and image.mode == "RGB"


def test_unknown_attribute_is_an_input_error():
    with pytest.raises(InputError):
        world.Scene("hexagon", "red")


def test_captions_parse_back_to_their_scene():
    rng = random.Random(3)
    for _ in range(300):
        scene = world.random_scene(rng, p_second=0.3)
        text = world.caption(scene, rng, p_size=0.5, p_position=0.5, p_background=0.5, p_there_is=0.3)
        parsed = world.parse_caption(text)
        assert parsed["shape"] == scene.shape and parsed["colour"] == scene.colour, text
        for field in ("size", "position"):
            assert parsed.get(field, getattr(scene, field)) == getattr(scene, field), text
        assert parsed.get("background", scene.background) == scene.background, text
        if scene.second is not None:
            assert parsed["second"]["shape"] == scene.second.shape, text


def test_full_caption_names_everything():
    scene = world.Scene("square", "blue", "big", "top left", background="white")
    text = world.full_caption(scene)
    assert text.startswith("a big blue square")
    assert world.parse_caption(text) == {"shape": "square", "colour": "blue", "size": "big", "position": "top left",
                                         "background": "white"}
    assert world.parse_caption("an orange circle in the middle") == {"shape": "circle", "colour": "orange",
                                                                     "position": "center"}


def test_parse_caption_rejects_unknown_words():
    with pytest.raises(InputError, match="dog"):
        world.parse_caption("a red dog")


def _tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def test_tokenizer_gives_every_world_word_one_token():
    from transformers import CLIPTokenizer

    direct = CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"))
    for tokenizer in (_tokenizer(), direct):
        ids = set()
        for word in world.VOCABULARY:
            pieces = tokenizer(word, add_special_tokens=False).input_ids
            assert len(pieces) == 1 and pieces[0] != tokenizer.unk_token_id, word
            ids.add(pieces[0])
        assert len(ids) == len(world.VOCABULARY)


def test_tokenizer_fits_the_longest_caption():
    tokenizer = _tokenizer()
    rng = random.Random(4)
    longest = 0
    for _ in range(500):
        scene = world.random_scene(rng, p_second=0.5)
        text = world.caption(scene, rng, p_background=1.0, p_there_is=0.5)
        longest = max(longest, len(tokenizer(text).input_ids))
    assert longest <= tokenizer.model_max_length
    assert tokenizer.model_max_length <= 32


def test_shipped_tokenizer_matches_its_generator():
    from imagic_lite.shapes.train import tokenizer_tables

    vocab, merges = tokenizer_tables()
    assert json.loads((TOKENIZER_DIR / "vocab.json").read_text()) == vocab
    lines = (TOKENIZER_DIR / "merges.txt").read_text().splitlines()[1:]
    assert [tuple(line.split()) for line in lines] == merges


needs_model = pytest.mark.skipif(not (MODEL_DIR / "model_index.json").exists(), reason="shapes model not built")


@needs_model
def test_shipped_model_loads_offline_and_samples():
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL_DIR), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings
    images = pipe("a red circle", num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()


@needs_model
def test_shipped_model_draws_what_it_is_asked():
    """Semantic check (about 3 s): colour, shape and position follow the caption (benchmarks/results/shapes-model.json
    has the 100-sample numbers)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL_DIR), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    scenes = [world.Scene("circle", "red", "big", "center"), world.Scene("square", "blue", "big", "top left"),
              world.Scene("triangle", "green", "big", "bottom right"), world.Scene("circle", "yellow", "big", "left")]
    images = pipe([world.full_caption(s) for s in scenes], num_inference_steps=25, guidance_scale=6.0,
                  generator=torch.Generator().manual_seed(0)).images
    hits, placed = 0, 0
    for scene, image in zip(scenes, images, strict=True):
        found = checker.read(image).main
        hits += found is not None and (found.colour, found.shape) == (scene.colour, scene.shape)
        placed += found is not None and found.position == scene.position
    assert hits >= 3
    assert placed >= 3


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_high_t_samples_are_scored_by_their_x0_error(prediction_type):
    import torch

    from imagic_lite.shapes.train import Config, denoising_loss

    torch.manual_seed(0)
    x0, noise, pred = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    a = torch.tensor([0.005, 0.3, 0.9])
    cfg = Config(prediction_type=prediction_type, high_t_x0_loss=True)
    a4 = a.view(-1, 1, 1, 1)
    x_t = a4.sqrt() * x0 + (1 - a4).sqrt() * noise
    if prediction_type == "epsilon":
        target = noise
        x0_hat = (x_t[:1] - (1 - a4[:1]).sqrt() * pred[:1]) / a4[:1].sqrt()
    else:
        target = a4.sqrt() * noise - (1 - a4).sqrt() * x0
        x0_hat = a4[:1].sqrt() * x_t[:1] - (1 - a4[:1]).sqrt() * pred[:1]
    # The first sample in x0, the other two against the schedule's own target.
    expected = torch.cat([(x0_hat - x0[:1]).pow(2).mean().view(1),
                          (pred[1:] - target[1:]).pow(2).mean(dim=(1, 2, 3))]).mean()
    assert torch.allclose(denoising_loss(cfg, pred, x0, noise, a, n_high=1), expected, rtol=1e-4)
    plain = Config(prediction_type=prediction_type)
    assert torch.allclose(denoising_loss(plain, pred, x0, noise, a, n_high=1), (pred - target).pow(2).mean())


def test_object_cells_weigh_more_in_the_loss():
    """object_loss_weight: an error on an object's latent cells costs more than the same error on background."""
    import torch

    from imagic_lite.shapes.train import Config, denoising_loss, object_masks

    scene = world.Scene("circle", "orange", "small", "center", "black")
    mask = object_masks([scene], 64, 16)
    assert mask.shape == (1, 1, 16, 16)
    assert mask[0, 0, 7, 7] == 1.0 and mask[0, 0, 0, 0] == 0.0  # centre covered, corner bare
    assert 0.02 < mask.mean().item() < 0.08  # a small circle: about pi * 0.1^2 of the image
    cfg = Config(prediction_type="epsilon")
    x0, noise, a = torch.zeros(1, 4, 16, 16), torch.zeros(1, 4, 16, 16), torch.tensor([0.5])
    on_object, on_background = torch.zeros(1, 4, 16, 16), torch.zeros(1, 4, 16, 16)
    on_object[..., 7, 7], on_background[..., 0, 0] = 1.0, 1.0
    weight = 1.0 + 9.0 * mask
    assert denoising_loss(cfg, on_object, x0, noise, a) == denoising_loss(cfg, on_background, x0, noise, a)
    weighted = [denoising_loss(cfg, pred, x0, noise, a, weight=weight) for pred in (on_object, on_background)]
    assert weighted[0].item() == pytest.approx(10 * weighted[1].item())
    # a uniform error keeps its plain value: the weighted mean is normalised
    ones = torch.ones(1, 4, 16, 16)
    assert denoising_loss(cfg, ones, x0, noise, a, weight=weight).item() == pytest.approx(1.0)


@pytest.mark.parametrize("latent_std", [0.0, 0.5])
def test_latent_cache_scaling_measured_or_fixed_by_config(tmp_path, latent_std):
    """A fine-tune on a new cache can keep its checkpoint's scaling factor (config latent_std) instead of the new
    cache's measured std; the cache holds the scenes it was rendered from, two-shape and non-gray-background ones
    at the config's rates."""
    from types import SimpleNamespace

    import torch

    from imagic_lite.shapes.train import Config, Logger, build_latent_cache

    class PixelVae:  # "encodes" by average pooling: latents follow the renders, no weights needed
        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mean=torch.nn.functional.avg_pool2d(x, 4)))

    cfg = Config(dataset_size=40, p_second=1.0, p_background=1.0, latent_std=latent_std)
    latents, scenes, scaling = build_latent_cache(cfg, PixelVae(), tmp_path, Logger(tmp_path / "log"))
    assert latents.shape == (40, 3, 16, 16) and len(scenes) == 40
    assert sum(s.second is not None for s in scenes) > 20
    assert all(s.background != world.DEFAULT_BACKGROUND for s in scenes)
    expected = 1 / latent_std if latent_std else 1 / latents.std().item()
    assert scaling == pytest.approx(expected, rel=1e-5)


class _RenderPipe:
    """Stands in for a pipeline in evaluate(): draws each caption's scene exactly, with the colours of two-shape
    scenes swapped when `swap` is set, so the pair scores have known answers."""

    def __init__(self, swap: bool):
        self.swap = swap

    def __call__(self, captions, **_):
        from types import SimpleNamespace

        images = []
        for text in captions:
            named = world.parse_caption(text)
            main, second = dict(named), named.get("second")
            main.pop("second", None)
            if self.swap and second is not None:
                main["colour"], second = second["colour"], {**second, "colour": main["colour"]}
            images.append(world.render(world.Scene(**main, second=world.Thing(**second) if second else None), 64))
        return SimpleNamespace(images=images)


@pytest.mark.parametrize("swap", [False, True])
def test_pair_evaluation_scores_binding_and_colour_swaps(swap):
    from imagic_lite.shapes.evaluate import evaluate, pair_accuracy

    records = evaluate(_RenderPipe(swap), n=12, steps=1, guidance=1.0, seed=3, batch=4, pairs=True)
    assert all(len(r["things"]) == 2 for r in records)
    scores = pair_accuracy(records)
    assert scores["shape_present"] == 1.0 and scores["shape"] == 1.0 and scores["two_objects"] == 1.0
    differ = sum(r["things"][0]["asked"]["colour"] != r["things"][1]["asked"]["colour"] for r in records) / 12
    assert differ > 0.5
    if swap:
        assert scores["colours_swapped"] == pytest.approx(differ)
        assert scores["both_shapes_right"] == pytest.approx(1 - differ)
    else:
        assert scores["colours_swapped"] == 0.0 and scores["colour"] == 1.0 and scores["both_shapes_right"] == 1.0


def test_fine_tuning_can_start_from_the_shipped_pipeline_folder():
    """The trainer's --init-from takes a pipeline folder (the run's checkpoints may be long gone): float32 weights
    that load into freshly built trainer models, EMA starting from the same weights."""
    import torch

    from imagic_lite.shapes.train import Config, initial_weights, load_tokenizer, make_text_encoder, make_unet

    cfg = Config()  # the shipped model's architecture is the trainer's default one
    state = initial_weights(MODEL_DIR)
    assert all(v.dtype == torch.float32 for v in state["unet"].values())
    assert state["ema_unet"] is state["unet"] and state["ema_text"] is state["text"]
    unet, text = make_unet(cfg), make_text_encoder(cfg, load_tokenizer())
    unet.load_state_dict(state["unet"])
    text.load_state_dict(state["text"])
