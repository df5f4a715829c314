"""The bundle: round trips, every refused-file case, a seeded corruption fuzz, model compatibility and export."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import pickle
import random
import struct
from pathlib import Path

import pytest
import torch

from imagic_lite.bundle import (
    Bundle,
    apply_bundle,
    check_compatible,
    describe,
    export,
    load_bundle,
    lora_shapes,
    save_bundle,
)
from imagic_lite.config import MemorySettings
from imagic_lite.errors import BundleError, InputError, OutputError
from imagic_lite.models import Cond, load_components

LORA = {"r": 4, "lora_alpha": 2.0, "target_modules": ["to_k", "to_out.0", "to_q", "to_v"]}  # alpha != r on purpose


@pytest.fixture(scope="module")
def models(tiny_models):
    """Loaded tiny components by kind, fp32 on the CPU."""
    memory = MemorySettings(weights="fp32", offload_encoders=False)
    return {kind: load_components(str(path), memory, torch.device("cpu")) for kind, path in tiny_models.items()}


def make_bundle(c, mode: str = "lora", seed: int = 0, lora: dict | None = None) -> Bundle:
    """A bundle for `c` with random, non-zero weights (a zero lora_B would make every comparison vacuous)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    dim = c.unet.config.cross_attention_dim
    pooled = c.text_encoders[-1].config.projection_dim if c.family.pooled else None

    def cond() -> Cond:
        embeds = torch.randn(1, 77, dim, generator=g)
        return Cond(embeds, None if pooled is None else torch.randn(1, pooled, generator=g))

    lora = lora or LORA
    if mode == "lora":
        weights = {k: 0.1 * torch.randn(s, generator=g) for k, s in sorted(lora_shapes(c.unet, lora).items())}
    else:
        weights = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in c.unet.state_dict().items()}
    meta = {"base_model": c.model_id, "unet_fingerprint": c.fingerprint, "family": c.family.name,
            "prediction_type": c.prediction_type, "height": "64", "width": "64", "prompt": "a dog lying down",
            "preset": "cpu", "settings": json.dumps({"embed": {"steps": 1}}), "tune_mode": mode, "seed": "0"}
    return Bundle(cond(), cond(), weights, mode, dict(lora) if mode == "lora" else None, meta,
                  Image.new("RGB", (300, 200), (200, 30, 30)))


def fresh(c):
    """Components sharing everything with `c` but a private UNet copy, so tests that apply weights stay apart."""
    view = copy.copy(c)
    view.unet = copy.deepcopy(c.unet)
    return view


@pytest.fixture(scope="module")
def good(models, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.imagic.safetensors"
    save_bundle(path, make_bundle(models["sd"]))
    return path


def unet_out(unet, cond: Cond, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=cond.embeds).sample


# ---------------------------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_keeps_everything_and_stores_fp16(models, tmp_path):
    bundle = make_bundle(models["sdxl"])
    path = tmp_path / "x.imagic.safetensors"
    size = save_bundle(path, bundle)
    assert size == path.stat().st_size
    loaded = load_bundle(path)
    assert torch.equal(loaded.e_opt.embeds, bundle.e_opt.embeds) and torch.equal(loaded.e_tgt.pooled,
                                                                                 bundle.e_tgt.pooled)
    assert set(loaded.weights) == set(bundle.weights) and loaded.lora == LORA and loaded.mode == "lora"
    for k, v in bundle.weights.items():
        assert loaded.weights[k].dtype == torch.float16 and torch.equal(loaded.weights[k], v.half())
    assert loaded.meta["prompt"] == "a dog lying down" and loaded.meta["seed"] == "0"
    assert "format" not in loaded.meta and json.loads(loaded.meta["versions"])["torch"]
    assert max(loaded.thumbnail.size) == 128
    save_bundle(path, bundle, thumbnail=False)
    assert load_bundle(path).thumbnail is None and path.stat().st_size < size


def test_lora_shapes_match_peft(models):
    from imagic_lite.lora import add_lora, expected_lora_shapes

    for kind in ("sd", "sdxl"):
        unet = copy.deepcopy(models[kind].unet)
        predicted = lora_shapes(unet, LORA)
        add_lora(unet, LORA)
        assert predicted == expected_lora_shapes(unet)
        assert lora_shapes(unet, LORA) == predicted  # also on a UNet that already carries an adapter


def test_apply_is_what_loading_gives(models, tmp_path):
    """Applying the in-memory bundle and applying the loaded file give identical outputs (fp16 rounding)."""
    c = fresh(models["sd"])
    bundle = make_bundle(c)
    path = tmp_path / "b.imagic.safetensors"
    save_bundle(path, bundle)
    base = unet_out(c.unet, bundle.e_opt)
    assert check_compatible(bundle, c) == []
    apply_bundle(bundle, c)
    in_memory = unet_out(c.unet, bundle.e_opt)
    apply_bundle(load_bundle(path), c)
    assert torch.equal(unet_out(c.unet, bundle.e_opt), in_memory)
    assert not torch.allclose(in_memory, base)


def test_full_mode_round_trip_and_no_export(models, tmp_path):
    c = models["sd"]
    bundle = make_bundle(c, mode="full")
    path = tmp_path / "full.imagic.safetensors"
    save_bundle(path, bundle)
    loaded = load_bundle(path)
    assert loaded.mode == "full" and loaded.lora is None and set(loaded.weights) == set(c.unet.state_dict())
    view = fresh(c)
    assert check_compatible(loaded, view) == []
    apply_bundle(loaded, view)
    key = "conv_in.weight"
    assert torch.equal(view.unet.state_dict()[key], bundle.weights[key].half().float())
    with pytest.raises(BundleError, match="only LoRA bundles can be exported"):
        export(loaded, "kohya", tmp_path / "out")


def test_describe(good):
    info = describe(good)
    names = {row[0]: row for row in info["tensors"]}
    assert names["e_opt"][1:3] == ("F32", (1, 77, 32)) and names["e_opt"][3] == 77 * 32 * 4
    assert info["metadata"]["format"] == "imagic-lite.bundle" and info["file_bytes"] == good.stat().st_size
    groups = {g["group"]: g for g in info["groups"]}
    assert groups["unet lora_A"]["count"] == groups["unet lora_B"]["count"] == len(names) // 2 - 1
    assert sum(g["bytes"] for g in groups.values()) == info["tensor_bytes"]


# ---------------------------------------------------------------------------------------------------------------
# Refused files: each one a BundleError with a one-line message


def read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_header(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def resave(good: Path, path: Path, tensors=None, meta=None) -> None:
    """Rewrite a good bundle through safetensors with changed tensors/metadata (as an attacker could)."""
    from safetensors.torch import load_file, save_file

    header, _ = read_header(good)
    all_tensors = load_file(good)
    save_file(tensors(all_tensors) if tensors else all_tensors, path,
              metadata=meta(header["__metadata__"]) if meta else header["__metadata__"])


def relabel(good: Path, path: Path, name: str, dtype: str) -> None:
    header, data = read_header(good)
    header[name]["dtype"] = dtype
    write_header(path, header, data)


def nan_in_e_opt(good: Path, path: Path) -> None:
    header, data = read_header(good)
    start = header["e_opt"]["data_offsets"][0]
    data = data[:start] + struct.pack("<f", float("nan")) + data[start + 4:]
    write_header(path, header, data)


def with_meta(**changes):
    return lambda m: {**m, **changes}


def lora_meta(**changes):
    return lambda m: {**m, "lora_config": json.dumps({**json.loads(m["lora_config"]), **changes})}


def duplicate_name(good: Path, path: Path) -> None:
    header, data = read_header(good)
    text = json.dumps(header)
    entry = json.dumps({"e_opt": header["e_opt"]})[1:-1]
    text = text[:-1] + ", " + entry + "}"
    path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + data)


CASES = {
    "missing file": (lambda g, p: None, "cannot read bundle"),
    "a directory": (lambda g, p: p.mkdir(), "not a regular file"),
    "empty file": (lambda g, p: p.write_bytes(b""), "too short"),
    "truncated": (lambda g, p: p.write_bytes(g.read_bytes()[:-100]), "truncated"),
    "truncated in header": (lambda g, p: p.write_bytes(g.read_bytes()[:200]), "truncated"),
    "trailing bytes": (lambda g, p: p.write_bytes(g.read_bytes() + b"\0" * 16), "trailing bytes"),
    "garbled header": (lambda g, p: p.write_bytes(g.read_bytes()[:8] + b"\xff" * 64 + g.read_bytes()[72:]),
                       "not valid JSON"),
    "pickle renamed": (lambda g, p: p.write_bytes(pickle.dumps({"e_opt": [1.0] * 10})), "not a safetensors file"),
    "torch.save renamed": (lambda g, p: torch.save({"e_opt": torch.zeros(3)}, p), "not a safetensors file"),
    "huge header length": (lambda g, p: p.write_bytes(struct.pack("<Q", 2**40) + b"{}" * 8),
                           "not a safetensors file"),
    "header length over 1 MiB": (lambda g, p: p.write_bytes(struct.pack("<Q", 2**20 + 1) + b" " * (2**20 + 9)),
                                 "not a safetensors file"),
    "header not an object": (lambda g, p: p.write_bytes(struct.pack("<Q", 2) + b"[]"), "no metadata"),
    "deeply nested JSON": (lambda g, p: p.write_bytes(struct.pack("<Q", 200000) + b"[" * 100000 + b"]" * 100000),
                           "not valid JSON"),
    "plain safetensors": (lambda g, p: resave(g, p, meta=lambda m: {"format": "pt"}), "not an imagic-lite bundle"),
    "format_version 2": (lambda g, p: resave(g, p, meta=with_meta(format_version="2")), "format version '2'"),
    "missing metadata key": (lambda g, p: resave(g, p, meta=lambda m: {k: v for k, v in m.items() if k != "width"}),
                             "lacks width"),
    "height not a number": (lambda g, p: resave(g, p, meta=with_meta(height="64px")), "height must be"),
    "height zero": (lambda g, p: resave(g, p, meta=with_meta(height="0")), "height must be"),
    "original size not a number": (lambda g, p: resave(g, p, meta=with_meta(original_height="1e9",
                                                                            original_width="10")),
                                   "original_height must be"),
    "original size half given": (lambda g, p: resave(g, p, meta=with_meta(original_width="640")), "only one of"),
    "escape codes in prompt": (lambda g, p: resave(g, p, meta=with_meta(prompt="\x1b[2Jhi")), "control characters"),
    "prompt too long": (lambda g, p: resave(g, p, meta=with_meta(prompt="a" * 5000)), "longer than"),
    "settings not JSON": (lambda g, p: resave(g, p, meta=with_meta(settings="{oops")), "not valid JSON"),
    "stored etas not numbers": (lambda g, p: resave(g, p, meta=with_meta(settings=json.dumps(
        {"sample": {"etas": ["a"]}}))), "key 'sample.etas', item 1: expected a number"),
    "stored seeds negative": (lambda g, p: resave(g, p, meta=with_meta(settings=json.dumps(
        {"sample": {"seeds": [-1]}}))), "seeds must be integers"),
    "stored sample not an object": (lambda g, p: resave(g, p, meta=with_meta(settings='{"sample": 3}')),
                                    "'sample' that is not a JSON object"),
    "versions a JSON list": (lambda g, p: resave(g, p, meta=with_meta(versions="[1]")), "must be a JSON object"),
    "unknown family": (lambda g, p: resave(g, p, meta=with_meta(family="flux")), "unknown model family"),
    "unknown tune mode": (lambda g, p: resave(g, p, meta=with_meta(tune_mode="dora")), "unknown tune mode"),
    "bad created date": (lambda g, p: resave(g, p, meta=with_meta(created="yesterday")), "ISO 8601"),
    "lora_alpha NaN": (lambda g, p: resave(g, p, meta=lambda m: {**m, "lora_config": m["lora_config"].replace(
        '"lora_alpha": 2.0', '"lora_alpha": NaN')}), "lora_alpha must be"),
    "target_modules a regex string": (lambda g, p: resave(g, p, meta=lora_meta(target_modules=".*")),
                                      "target_modules must be"),
    "extra lora_config key": (lambda g, p: resave(g, p, meta=lora_meta(use_dora=True)), "exactly the keys"),
    "F32 relabelled I32": (lambda g, p: relabel(g, p, "e_opt", "I32"), "dtype I32"),
    "unknown dtype": (lambda g, p: relabel(g, p, "e_opt", "F31"), "malformed header entry"),
    "NaN in e_opt": (nan_in_e_opt, "NaN or Inf"),
    "unknown tensor name": (lambda g, p: resave(g, p, tensors=lambda t: {**t, "payload": torch.zeros(4)}),
                            "unexpected tensor 'payload'"),
    "full weights in a lora bundle": (lambda g, p: resave(g, p, tensors=lambda t: {
        **t, "unet_full.conv_in.weight": torch.zeros(4, dtype=torch.float16)}), "unexpected tensor"),
    "pooled tensors on sd": (lambda g, p: resave(g, p, tensors=lambda t: {
        **t, "e_opt_pooled": torch.zeros(1, 8), "e_tgt_pooled": torch.zeros(1, 8)}), "unexpected tensor"),
    "e_opt missing": (lambda g, p: resave(g, p, tensors=lambda t: {k: v for k, v in t.items() if k != "e_opt"}),
                      "lacks e_opt"),
    "e_opt shape differs": (lambda g, p: resave(g, p, tensors=lambda t: {**t, "e_opt": torch.zeros(1, 76, 32)}),
                            "must be equal"),
    "e_opt batch 2": (lambda g, p: resave(g, p, tensors=lambda t: {**t, "e_opt": torch.zeros(2, 77, 32),
                                                                     "e_tgt": torch.zeros(2, 77, 32)}),
                      "batch 1"),
    "huge thumbnail": (lambda g, p: resave(g, p, tensors=lambda t: {
        **t, "thumbnail": torch.zeros(512, 512, 3, dtype=torch.uint8)}), "thumbnail shape"),
    "LoRA rank not matching r": (lambda g, p: resave(g, p, meta=lora_meta(r=8)), "do not fit rank r=8"),
    "lora_B without lora_A": (lambda g, p: resave(g, p, tensors=lambda t: {
        k: v for k, v in t.items() if not k.endswith("attn1.to_q.lora_A.weight")}), "do not fit rank"),
    "duplicate tensor name": (duplicate_name, "twice"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused(case, good, tmp_path):
    make, message = CASES[case]
    path = tmp_path / "bad.imagic.safetensors"
    make(good, path)
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(path)
    assert "\n" not in str(info.value)


def test_oversized_file_refused(good):
    with pytest.raises(BundleError, match="over the 1000-byte limit"):
        load_bundle(good, max_bytes=1000)


def _meta_unet(arch: str):
    from diffusers import UNet2DConditionModel

    from imagic_lite.models import arch_dir

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(arch_dir() / arch / "unet"))


def _sparse_bundle(path: Path, meta: dict[str, str], tensors: dict[str, tuple[str, list[int]]]) -> Path:
    """A bundle file of real length whose data is a hole: headers are checked, no disk is used, nothing is read."""
    header, offset = {"__metadata__": meta}, 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * {"F32": 4, "F16": 2, "U8": 1}[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    write_header(path, header, b"")
    os.truncate(path, path.stat().st_size + offset)
    return path


def test_full_sdxl_bundle_is_within_the_loaders_cap(models, tmp_path):
    """A full-mode SDXL bundle (5.1 GB) was written but refused by a flat 4 GiB cap: the header of a real-size one,
    in a file of its real length, now passes every check `info` makes; claiming family "sd" it is over SD's cap."""
    from imagic_lite.bundle import FULL_UNET_PARAMS

    counts = {arch: sum(p.numel() for p in _meta_unet(arch).parameters()) for arch in ("sd15", "sd21", "sdxl")}
    assert {"sd": max(counts["sd15"], counts["sd21"]), "sdxl": counts["sdxl"]} == FULL_UNET_PARAMS
    small = tmp_path / "small.imagic.safetensors"
    save_bundle(small, make_bundle(models["sdxl"], mode="full"))
    meta = read_header(small)[0]["__metadata__"]
    embeds = {"e_tgt": ("F32", [1, 77, 2048]), "e_opt": ("F32", [1, 77, 2048]), "thumbnail": ("U8", [85, 128, 3])}
    unet = {f"unet_full.{k}": ("F16", list(v.shape)) for k, v in _meta_unet("sdxl").state_dict().items()}
    pooled = {"e_tgt_pooled": ("F32", [1, 1280]), "e_opt_pooled": ("F32", [1, 1280])}
    path = _sparse_bundle(tmp_path / "big.imagic.safetensors", meta, embeds | pooled | unet)
    assert path.stat().st_size > 5 * 10**9
    info = describe(path)
    assert info["metadata"]["tune_mode"] == "full" and info["file_bytes"] == path.stat().st_size
    claim = _sparse_bundle(tmp_path / "sd.imagic.safetensors", meta | {"family": "sd"}, embeds | unet)
    with pytest.raises(BundleError, match="over the .*-byte limit for a sd full-mode bundle"):
        describe(claim)


def test_writer_refuses_what_the_loader_would(models, tmp_path, monkeypatch):
    """Writer and loader share `size_cap`: over it, save_bundle writes nothing and says what to change."""
    import imagic_lite.bundle as bundle_module

    bundle = make_bundle(models["sd"], mode="full")
    path = tmp_path / "full.imagic.safetensors"
    written = save_bundle(path, bundle)
    assert load_bundle(path).mode == "full"
    monkeypatch.setattr(bundle_module, "EXTRAS_CAP", 0)
    monkeypatch.setattr(bundle_module, "FULL_UNET_PARAMS", {"sd": written // 4, "sdxl": 1})
    with pytest.raises(BundleError, match="over the .*-byte limit for a sd full-mode bundle; nothing was written"):
        save_bundle(tmp_path / "refused.imagic.safetensors", bundle)
    assert not list(tmp_path.glob("refused*")) and not list(tmp_path.glob(".refused*"))
    with pytest.raises(BundleError, match="over the .*-byte limit for a sd full-mode bundle"):
        load_bundle(path)
    monkeypatch.setattr(bundle_module, "LORA_CAP", 1000)
    with pytest.raises(BundleError, match="lower tune.rank"):
        save_bundle(tmp_path / "lora.imagic.safetensors", make_bundle(models["sd"]))


def test_pickle_is_never_unpickled(tmp_path, monkeypatch):
    """The header check refuses a pickle before any parser runs; make unpickling fatal to be sure."""

    class Boom:
        def __reduce__(self):
            return (print, ("unpickled!",))

    path = tmp_path / "evil.imagic.safetensors"
    path.write_bytes(pickle.dumps(Boom()))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(BundleError, match="never opened"):
        load_bundle(path)


def test_save_refuses_what_load_would(models, tmp_path):
    bundle = make_bundle(models["sd"])
    bundle.weights = {k: v * 1e6 for k, v in bundle.weights.items()}  # overflows fp16
    with pytest.raises(BundleError, match="NaN or Inf"):
        save_bundle(tmp_path / "x.imagic.safetensors", bundle)
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_fuzz_corruption_is_bundle_error_or_success(good, tmp_path):
    """Seeded byte-level corruption (flips, truncation, splices): success or BundleError, nothing else."""
    rng = random.Random(1234)
    raw = good.read_bytes()
    n_header = 8 + int.from_bytes(raw[:8], "little")
    path = tmp_path / "fuzz.imagic.safetensors"
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(300):
        data = bytearray(raw)
        kind = rng.choice(["flip", "flip-header", "truncate", "splice", "insert"])
        if kind == "flip" or kind == "flip-header":
            end = n_header if kind == "flip-header" else len(data)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(end)] = rng.randrange(256)
        elif kind == "truncate":
            data = data[:rng.randrange(len(data))]
        elif kind == "splice":
            a, b = sorted(rng.randrange(len(data)) for _ in range(2))
            c = rng.randrange(len(data))
            data[c:c + (b - a)] = raw[a:b]
        else:
            at = rng.randrange(len(data))
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        path.write_bytes(bytes(data))
        try:
            load_bundle(path)
            outcomes["ok"] += 1
        except BundleError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100 and outcomes["ok"] > 0  # flips inside tensor data can stay valid


def test_fuzz_header_values_is_bundle_error_or_success(good, tmp_path):
    """Seeded structural fuzz: valid JSON with one field swapped for an odd value (byte flips rarely get here)."""
    rng = random.Random(99)
    header, data = read_header(good)
    odd = [None, -1, 0, 1, 2**70, 1.5, True, "", "x", "F16", "I32", "NaN", "1e400", [], {}, [1], [0, 2**64], [-1, 4],
           [2, 1], [1, 77, 32], "[1]", "{}", '{"r": 4}', "\x1b[2J", "9" * 5000]
    path = tmp_path / "fuzz.imagic.safetensors"
    for _ in range(400):
        mutated = copy.deepcopy(header)
        name = rng.choice(list(mutated))
        field = rng.choice(list(mutated[name]))
        if name != "__metadata__" and field == "shape" and rng.random() < 0.5:
            mutated[name][field] = [rng.choice([0, 1, 2, 3, 4, 64, 2**40]) for _ in mutated[name][field]]
        elif rng.random() < 0.1:
            del mutated[name][field]
        else:
            mutated[name][field] = rng.choice(odd)
        write_header(path, mutated, data)
        try:
            load_bundle(path)
        except BundleError as exc:
            assert "\n" not in str(exc)


# ---------------------------------------------------------------------------------------------------------------
# Against a loaded model


def test_other_fingerprint_refused_then_warned_with_force(models):
    c = models["sd"]
    bundle = make_bundle(c)
    bundle.meta["unet_fingerprint"] = "0123456789abcdef"
    with pytest.raises(BundleError, match=rf"0123456789abcdef.*{c.fingerprint}.*--force"):
        check_compatible(bundle, c)
    warnings = check_compatible(bundle, c, force=True)
    assert len(warnings) == 1 and "0123456789abcdef" in warnings[0]


def test_other_prediction_type_is_forceable(models):
    bundle = make_bundle(models["sd"])  # sd-v has the same UNet weights but v-prediction
    with pytest.raises(BundleError, match="prediction type epsilon"):
        check_compatible(bundle, models["sd-v"])
    assert len(check_compatible(bundle, models["sd-v"], force=True)) == 1


def test_shape_mismatch_is_an_error_even_with_force(models):
    bundle = make_bundle(models["sd"])
    with pytest.raises(BundleError, match="cannot work.*embeddings are \\(1, 77, 32\\).*needs \\(1, 77, 64\\)"):
        check_compatible(bundle, models["sdxl"], force=True)
    with pytest.raises(BundleError, match="do not fit"):
        apply_bundle(bundle, fresh(models["sdxl"]))


def test_apply_wraps_lora_mismatch(models):
    bundle = make_bundle(models["sd"])
    bundle.weights = dict(list(bundle.weights.items())[2:])
    with pytest.raises(BundleError, match="do not fit this UNet"):
        check_compatible(bundle, models["sd"])
    with pytest.raises(BundleError, match="do not fit this UNet"):
        apply_bundle(bundle, fresh(models["sd"]))


# ---------------------------------------------------------------------------------------------------------------
# Export


def _pipeline(folder: Path, sdxl: bool = False):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    return cls.from_pretrained(folder, local_files_only=True, use_safetensors=True)


def _sdxl_out(unet, bundle: Bundle) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    kwargs = {"text_embeds": bundle.e_opt.pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]),
                    encoder_hidden_states=bundle.e_opt.embeds, added_cond_kwargs=kwargs).sample


def test_export_diffusers_and_kohya_load_in_diffusers(models, tiny_models, tmp_path):
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    c = fresh(models["sd"])
    bundle = make_bundle(c, seed=3)
    files = export(bundle, "diffusers", tmp_path / "d")
    assert sorted(p.name for p in files) == ["README.md", "embeddings.safetensors", "pytorch_lora_weights.safetensors"]
    pipe = _pipeline(tiny_models["sd"])
    base = unet_out(pipe.unet, bundle.e_opt)
    pipe.load_lora_weights(tmp_path / "d")
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=pipe.get_active_adapters()[0])
    assert set(loaded) == set(bundle.weights)  # no missing and no unexpected keys
    assert all(torch.equal(loaded[k].half(), v.half()) for k, v in bundle.weights.items())
    via_diffusers = unet_out(pipe.unet, bundle.e_opt)
    assert not torch.allclose(via_diffusers, base)
    apply_bundle(bundle, c)  # the real lora_alpha reached diffusers through the adapter metadata
    torch.testing.assert_close(via_diffusers, unet_out(c.unet, bundle.e_opt), rtol=1e-4, atol=1e-5)
    with safe_open(tmp_path / "d" / "embeddings.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("prompt_embeds"), bundle.e_opt.embeds) and "eta" in f.metadata()["about"]
    assert "thumbnail" not in str(files)
    assert str(tiny_models["sd"]) not in (tmp_path / "d" / "README.md").read_text()  # no local paths shared

    (kohya,) = export(bundle, "kohya", tmp_path / "k", name="my-edit")
    with safe_open(kohya, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha_key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha"
        assert f.get_tensor(alpha_key).item() == 2.0  # the real alpha, not r = 4
    assert f"{alpha_key[:-6]}.lora_down.weight" in keys and len(keys) == len(bundle.weights) * 3 // 2
    assert all(k.startswith("lora_unet_") for k in keys)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["ss_network_alpha"] == "2.0"
    required = ("sai_model_spec", "architecture", "implementation", "title", "resolution")
    assert {f"modelspec.{k}" for k in required} < set(meta)
    kohya_pipe = _pipeline(tiny_models["sd"])
    kohya_pipe.load_lora_weights(tmp_path / "k", weight_name="my-edit.safetensors")
    torch.testing.assert_close(unet_out(kohya_pipe.unet, bundle.e_opt), via_diffusers, rtol=1e-4, atol=1e-5)


# Every module kind SGM numbers differently: attention in down/mid/up blocks, resnet convs, time projection,
# shortcut, down/upsampler convs, conv_in/out, the time and added-condition MLPs.
SGM_LORA = {"r": 4, "lora_alpha": 2.0, "target_modules": [
    "to_q", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv2", "time_emb_proj", "conv_shortcut", "conv", "conv_in",
    "conv_out", "time_embedding.linear_1", "add_embedding.linear_2"]}


def test_export_warns_about_modules_kohya_sd_scripts_drops(models):
    from imagic_lite.bundle import export_warnings

    wide = make_bundle(models["sdxl"], lora=SGM_LORA)
    (line,) = export_warnings(wide, "kohya")
    for module in ("conv_in", "conv_out", "time_embedding.linear_1", "add_embedding.linear_2"):
        assert module in line
    assert "to_q" not in line and "conv1" not in line and "down_blocks" not in line
    assert export_warnings(wide, "diffusers") == [] and export_warnings(make_bundle(models["sdxl"]), "kohya") == []


@pytest.mark.parametrize("lora", [LORA, SGM_LORA], ids=["attention", "every-module-kind"])
def test_export_sdxl_kohya_matches_diffusers_export(models, tiny_models, tmp_path, lora):
    from safetensors import safe_open

    bundle = make_bundle(models["sdxl"], seed=4, lora=lora)
    export(bundle, "diffusers", tmp_path / "d")
    (kohya,) = export(bundle, "kohya", tmp_path / "k")
    with safe_open(kohya, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    # SGM numbering as sd-scripts writes SDXL LoRAs (what A1111/Forge read), checked against diffusers' reverse map
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                             "lora_unet_out_2", "lora_unet_time_embed_", "lora_unet_label_emb_")) for k in keys)
    assert len(keys) == len(bundle.weights) * 3 // 2
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    if lora is SGM_LORA:
        expected = {"input_blocks_0_0", "input_blocks_1_0_in_layers_2", "input_blocks_3_0_op",
                    "input_blocks_4_1_proj_in", "input_blocks_4_0_skip_connection", "input_blocks_5_0_emb_layers_1",
                    "middle_block_1_transformer_blocks_0_attn1_to_q", "middle_block_2_out_layers_3",
                    "output_blocks_2_2_conv", "output_blocks_0_1_transformer_blocks_0_ff_net_2", "out_2",
                    "time_embed_0", "label_emb_0_2"}
        assert {f"lora_unet_{e}.alpha" for e in expected} <= keys
    outs = []
    for folder, name in ((tmp_path / "d", None), (tmp_path / "k", kohya.name)):
        pipe = _pipeline(tiny_models["sdxl"], sdxl=True)
        base = _sdxl_out(pipe.unet, bundle)
        pipe.load_lora_weights(folder, weight_name=name)
        outs.append(_sdxl_out(pipe.unet, bundle))
        assert not torch.allclose(outs[-1], base)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_export_refuses_existing_files_and_bad_options(models, tmp_path):
    bundle = make_bundle(models["sd"])
    export(bundle, "kohya", tmp_path, name="a")
    with pytest.raises(OutputError, match="already exists.*--overwrite"):
        export(bundle, "kohya", tmp_path, name="a")
    assert export(bundle, "kohya", tmp_path, name="a", overwrite=True) == [tmp_path / "a.safetensors"]
    with pytest.raises(InputError, match="'diffusers' or 'kohya'"):
        export(bundle, "a1111", tmp_path)
    with pytest.raises(InputError, match="export name"):
        export(bundle, "kohya", tmp_path, name="../evil")


def test_bundle_size_sd15_under_4mb():
    script = Path(__file__).parent.parent / "benchmarks" / "bundle_size.py"
    spec = importlib.util.spec_from_file_location("bundle_size", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.measure()
    assert result["tensors"] == 2 + 2 * 128 + 1 and result["bytes_with_thumbnail"] < 4 * 2**20


# Library features the code relies on, with the first release that has them (read from the released wheels).
NEEDS = {("diffusers", "0.34"): "StableDiffusionLoraLoaderMixin.save_lora_weights(unet_lora_adapter_metadata=...), "
                                "which carries the real lora_alpha into the diffusers export"}


def test_setup_cfg_allows_no_release_without_what_export_uses():
    import configparser
    import inspect

    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from packaging.requirements import Requirement
    from packaging.version import Version

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).parent.parent / "setup.cfg")
    lines = [line.strip() for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    pins = {r.name: r.specifier for r in map(Requirement, lines)}
    for (package, first), why in NEEDS.items():
        lowest = min(Version(s.version) for s in pins[package] if s.operator == ">=")
        assert lowest >= Version(first), f"setup.cfg allows {package} {lowest}, but the code uses {why} ({first})"
    save = inspect.signature(StableDiffusionLoraLoaderMixin.save_lora_weights)
    assert "unet_lora_adapter_metadata" in save.parameters  # the installed diffusers has it too
