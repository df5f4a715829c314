"""Model resolution: hub downloads and the UNet fingerprint take exactly the files that are loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from imagic_lite.models import HUB_PATTERNS, file_fingerprint, loaded_unet_files, resolve_model

# A hub repo as published (SD 1.5's layout, plus SDXL-style sharded UNet and text encoder): every variant, .bin and
# single-file checkpoint is there, and only the non-variant safetensors (and small configs) are ever loaded.
REPO = [
    "model_index.json", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt",
    "feature_extractor/preprocessor_config.json", "safety_checker/model.fp16.safetensors",
    "safety_checker/pytorch_model.bin", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin", "text_encoder/model.fp16-00001-of-00002.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model.safetensors.index.json",
    "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.fp16.json", "text_encoder_2/model.fp16-00001-of-00002.safetensors",
    "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer/tokenizer_config.json", "tokenizer_2/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors.index.json",
    "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
    "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
    "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
    "unet/diffusion_pytorch_model-00001-of-00002.fp16.safetensors",  # diffusers' legacy variant shard name
    "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.bin",
]
LOADED = {
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model.safetensors.index.json",
    "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors",
    "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer/tokenizer_config.json", "tokenizer_2/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.safetensors.index.json",
    "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
    "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
}


def test_hub_download_takes_only_the_loaded_files(tmp_path, monkeypatch):
    """resolve_model hands snapshot_download patterns that select the non-variant files and nothing else."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = []

    def fake_snapshot_download(repo_id, *, allow_patterns=None, local_files_only=False, **kwargs):
        calls.append(list(allow_patterns))
        folder = tmp_path / "snapshot"
        for name in filter_repo_objects(REPO, allow_patterns=allow_patterns):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text("{}" if name.endswith(".json") else "")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    folder = resolve_model("owner/model")
    assert calls == [list(HUB_PATTERNS)]
    got = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert got == LOADED, (got - LOADED, LOADED - got)


def _noise_file(path: Path, seed: int) -> None:
    save_file({"w": torch.randn(64, generator=torch.Generator().manual_seed(seed))}, str(path))


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_fingerprint_ignores_variant_files_beside_the_loaded_ones(tiny_sd, tmp_path, layout):
    unet = tmp_path / "unet"
    unet.mkdir()
    if layout == "single":
        shutil.copy(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors", unet)
        expected = [unet / "diffusion_pytorch_model.safetensors"]
    else:
        shards = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
        for i, name in enumerate(shards):
            _noise_file(unet / name, i)
        index = {"metadata": {}, "weight_map": {"a.w": shards[0], "b.w": shards[1], "c.w": shards[0]}}
        (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        expected = [unet / n for n in shards]
    assert loaded_unet_files(unet) == expected
    before = file_fingerprint(unet)
    for seed, name in enumerate(["diffusion_pytorch_model.fp16.safetensors",
                                 "diffusion_pytorch_model.non_ema.safetensors",
                                 "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
                                 "diffusion_pytorch_model-00001-of-00002.fp16.safetensors"], start=10):
        _noise_file(unet / name, seed)
    assert loaded_unet_files(unet) == expected and file_fingerprint(unet) == before
    _noise_file(expected[-1], 99)  # the loaded weights themselves do count
    assert file_fingerprint(unet) != before


def test_fingerprint_of_an_unusable_index_falls_back(tmp_path):
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weight_map": {"a": "../../etc/passwd"}}')
    assert loaded_unet_files(unet) == [] and file_fingerprint(unet) is None
