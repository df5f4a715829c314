"""Loading a checkpoint (hub id, local folder, or the shipped `shapes`) into Components with the memory knobs applied.

The one place that knows SD 1/2 from SDXL: a small Family table plus one text-encode function per family.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import DEFAULT_MODEL, MemorySettings  # noqa: F401 - DEFAULT_MODEL re-exported
from .errors import ConfigError, InputError, ModelError
from .quant import cast_frozen, quantize_bnb, store_fp8


@dataclass
class Cond:
    """Text conditioning: the encoder output sequence, plus the pooled vector on SDXL."""

    embeds: torch.Tensor  # (B, tokens, dim)
    pooled: torch.Tensor | None = None  # (B, 1280) on SDXL

    def lerp(self, other: Cond, eta: float) -> Cond:
        """eta * self + (1 - eta) * other: the paper's eq. (3) with self = e_tgt, other = e_opt."""
        pooled = None if self.pooled is None else eta * self.pooled + (1 - eta) * other.pooled
        return Cond(eta * self.embeds + (1 - eta) * other.embeds, pooled)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Cond:
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        return Cond(self.embeds.to(device, dtype), pooled)

    def repeat(self, n: int) -> Cond:
        pooled = None if self.pooled is None else self.pooled.repeat(n, 1)
        return Cond(self.embeds.repeat(n, 1, 1), pooled)

    @staticmethod
    def cat(conds: list[Cond]) -> Cond:
        pooled = None if conds[0].pooled is None else torch.cat([c.pooled for c in conds])
        return Cond(torch.cat([c.embeds for c in conds]), pooled)


@dataclass(frozen=True)
class Family:
    """What differs between model families, as data."""

    name: str
    text_encoders: int  # SDXL concatenates two encoders' penultimate layers
    pooled: bool  # SDXL feeds the second encoder's pooled output to the UNet
    vae_fp16_unsafe: bool  # the stock SDXL VAE overflows in fp16: decode it in fp32 (bf16 is fine)
    zero_uncond: bool = False  # the pipeline honours model_index.json's force_zeros_for_empty_prompt (default on)


FAMILIES = {
    "sd": Family("sd", text_encoders=1, pooled=False, vae_fp16_unsafe=False),
    "sdxl": Family("sdxl", text_encoders=2, pooled=True, vae_fp16_unsafe=True, zero_uncond=True),
}


@dataclass
class Components:
    """A loaded model: modules on their devices, plus the facts the stages read from it."""

    family: Family
    unet: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list
    scheduler: object  # the training noise schedule (DDPM config of the checkpoint)
    device: torch.device
    dtype: torch.dtype  # compute dtype for frozen weights (autocast); trainables are fp32
    model_id: str
    fingerprint: str
    memory: MemorySettings
    notes: list[str] = field(default_factory=list)
    pristine: dict[str, torch.Tensor] | None = None  # CPU copy of the base UNet, kept before a full fine-tune
    unet_changed: bool = False  # the base weights differ from `pristine` (see pristine.py)
    host: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where offloaded modules wait
    zero_uncond: bool = False  # the unconditional embedding is zeros, not the empty prompt's (SDXL; see encode_uncond)

    @property
    def offloads(self) -> bool:
        """Whether moving a module to `host` frees accelerator memory (not when the host computes)."""
        return self.device.type != self.host.type

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native(self) -> int:
        """The model's native resolution in pixels: UNet sample size x VAE downscale."""
        return int(self.unet.config.sample_size) * self.vae_scale

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this so every UNet level has an integer size."""
        return self.vae_scale * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def autocast(self):
        """Autocast to the compute dtype (a no-op context in fp32)."""
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)


# ---------------------------------------------------------------------------------------------------------------
# Resolving a model name to a folder


def shapes_dir() -> Path:
    from .shapes import MODEL_DIR

    return Path(MODEL_DIR)


def arch_dir() -> Path:
    """Full-size architectures kept as configs only (no weights): `arch:sd15`, `arch:sd21`, `arch:sdxl`."""
    return Path(__file__).resolve().parent / "archs"


def resolve_model(model: str) -> Path:
    """A local diffusers folder for `model`: `shapes`, `arch:NAME`, a path, or a hub id (cached, else downloaded)."""
    if model.startswith("arch:"):
        path = arch_dir() / model[5:]
        if not (path / "model_index.json").is_file():
            names = sorted(p.name for p in arch_dir().iterdir() if (p / "model_index.json").is_file())
            raise ModelError(f"unknown architecture {model!r}; choose one of: {', '.join('arch:' + n for n in names)}")
        return path
    if model == "shapes":
        path = shapes_dir()
        if not (path / "model_index.json").is_file():
            raise ModelError(f"the shipped shapes model is missing from {path}; reinstall imagic-lite")
        return path
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{path} is not a diffusers model folder (no model_index.json)")
        return path
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise ModelError(f"model {model!r} is neither a local folder nor a hub id like owner/name")
    try:
        from huggingface_hub import snapshot_download

        patterns = list(HUB_PATTERNS)
        try:
            return Path(snapshot_download(model, allow_patterns=patterns, local_files_only=True))
        except Exception:
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
                raise
            return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as exc:
        reason = type(exc).__name__
        raise ModelError(
            f"model {model!r} is not on this machine and could not be downloaded ({reason}); "
            f"fix: run `{download_command(model)}` where there is internet, or pass --model /path/to/folder"
        ) from None


# Exactly what we load (the non-variant safetensors, single or sharded with its index): hub repos also hold
# multi-GB single-file checkpoints, `.fp16`/`.non_ema` variant copies and .bin files, which we never read.
# huggingface_hub matches these with fnmatch, where `*` also matches `.`: a `*` next to the stem would take
# `diffusion_pytorch_model.fp16.safetensors` too, so shard numbers are spelled out (5 digits, as every writer does).
_SHARD = "-" + "[0-9]" * 5 + "-of-" + "[0-9]" * 5 + ".safetensors"
HUB_PATTERNS = ("model_index.json", "*/config.json", "scheduler/*.json", "tokenizer*/*",
                "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors.index.json",
                "unet/diffusion_pytorch_model" + _SHARD,
                "vae/diffusion_pytorch_model.safetensors",
                "text_encoder*/model.safetensors", "text_encoder*/model.safetensors.index.json",
                "text_encoder*/model" + _SHARD)


def download_command(model: str) -> str:
    """The download command of the installed huggingface_hub: `hf` since 0.34; `huggingface-cli` before (removed
    in 1.0). Failing both, the Python call, which every version has."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        scripts = {e.name for e in distribution("huggingface_hub").entry_points if e.group == "console_scripts"}
    except PackageNotFoundError:
        scripts = set()
    if "hf" in scripts:  # typer: one --include per pattern
        return f"hf download {model} " + " ".join(f"--include '{p}'" for p in HUB_PATTERNS)
    if "huggingface-cli" in scripts:  # argparse: --include takes the list
        return f"huggingface-cli download {model} --include " + " ".join(f"'{p}'" for p in HUB_PATTERNS)
    return (f"python -c \"from huggingface_hub import snapshot_download; "
            f"snapshot_download('{model}', allow_patterns={list(HUB_PATTERNS)})\"")


def model_index(path: Path) -> dict:
    import json

    try:
        return json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}/model_index.json is unreadable: {exc}") from None


def detect_family(path: Path) -> Family:
    from .vram import family_of_index

    return FAMILIES[family_of_index(model_index(path))]


# ---------------------------------------------------------------------------------------------------------------
# Loading


def compute_dtype(weights: str, device: torch.device) -> torch.dtype:
    if weights == "fp32":
        return torch.float32
    if weights == "fp16":
        return torch.float16
    if weights == "bf16":
        return torch.bfloat16
    # "half": bf16 where the card computes it natively (no loss scaling needed), else fp16 + loss scaling.
    # torch.cuda.is_bf16_supported() counts emulation (a T4 says True) and asks the current device, not `device`.
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return torch.float16
    return torch.bfloat16


def emulated_bf16_note(dtype: torch.dtype, device: torch.device) -> str | None:
    """What to tell a user who asked for bf16 (weights = "bf16") on a card below compute capability 8.0: it runs,
    because PyTorch emulates bf16 there, but slower than the fp16 that "half" would have picked."""
    if dtype != torch.bfloat16 or device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= (8, 0):
        return None
    return (f"weights bf16 on a card of compute capability {major}.{minor}, which has no bf16 arithmetic: PyTorch "
            "emulates it, slower than fp16; weights = \"half\" picks fp16 with loss scaling on this card")


def unet_fingerprint(unet: nn.Module) -> str:
    """Identity of in-memory weights (architectures built from configs): names, shapes, strided values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        sample = flat[::step][:64].to(torch.float32).to(torch.float16).cpu()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def _build_random(path: Path, family: Family) -> tuple:
    """An architecture folder holds configs only: build it with random weights (memory and speed do not depend
    on weight values). The tokenizer is our byte-level one; every id it makes is valid for CLIP's vocabulary."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(path / "vae"))
    tokenizer_dir = arch_dir() / "tokenizer"
    vocab, merges = str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt")
    tokenizer = CLIPTokenizer(vocab, merges, model_max_length=77)
    encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(path / "text_encoder"))]
    if family.text_encoders == 2:
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(path / "text_encoder_2")))
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(path / "scheduler"))
    return unet, vae, encoders, [tokenizer] * family.text_encoders, scheduler


def loaded_unet_files(folder: Path) -> list[Path]:
    """The UNet weight files diffusers loads from `folder` (no variant, safetensors): the shards an index names
    when the index exists (diffusers prefers it), else the single file; [] when neither is there or the index
    is unusable (loading then fails or falls back, and the in-memory fingerprint applies)."""
    import json

    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []
        if not all(isinstance(n, str) and n == Path(n).name and (folder / n).is_file() for n in names):
            return []
        return [folder / n for n in sorted(names)]
    single = folder / "diffusion_pytorch_model.safetensors"
    return [single] if single.is_file() else []


def file_fingerprint(folder: Path) -> str | None:
    """Identity of a UNet checkpoint from the safetensors files we load (`loaded_unet_files`; a `.fp16` or
    `.non_ema` copy beside them changes nothing): header plus 4096 strided 16-byte samples of the data, so it does
    not depend on the dtype we load into and costs milliseconds even for SDXL's 10 GB file."""
    files = loaded_unet_files(folder)
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            digest.update(fh.read(min(header_len, 100_000_000)))
            for i in range(4096):
                fh.seek(8 + header_len + (size - 8 - header_len) * i // 4096)
                digest.update(fh.read(16))
    return digest.hexdigest()[:16]


def _load(path: Path, family: Family, dtype: torch.dtype) -> tuple:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if path.parent == arch_dir():
        return _build_random(path, family)
    # Loading straight into the compute dtype halves the host-RAM peak (SDXL's fp32 UNet alone is 10 GB).
    common = {"use_safetensors": True, "local_files_only": True}
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **common)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **common)
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")]
        encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **common)]
        if family.text_encoders == 2:
            tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
            encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **common))
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (imagic-lite loads .safetensors weights only, never pickled .bin files)" if ".bin" in str(exc) else ""
        raise ModelError(f"cannot load the model in {path}: {first}{hint}") from None
    return unet, vae, encoders, tokenizers, scheduler


def pick_device(device: str | None = None) -> torch.device:
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available on this machine")
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def library_chatter(shown: bool) -> Iterator[None]:
    """Silence what diffusers, transformers and bitsandbytes print while loading ("Loading weights" bars, "modules
    ... kept in float32", bitsandbytes' CPU-kernel warning at import): the library never prints, and the CLI shows
    only its own lines unless --debug. Every setting is restored afterwards."""
    if shown:
        yield
        return
    import diffusers
    import transformers

    dlog, tlog = diffusers.utils.logging, transformers.utils.logging
    bnb = logging.getLogger("bitsandbytes")
    before = (dlog.get_verbosity(), tlog.get_verbosity(), dlog.is_progress_bar_enabled(),
              tlog.is_progress_bar_enabled(), bnb.level)
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    bnb.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlog.set_verbosity(before[0])
        tlog.set_verbosity(before[1])
        if before[2]:
            dlog.enable_progress_bar()
        if before[3]:
            tlog.enable_progress_bar()
        bnb.setLevel(before[4])


def load_components(model: str, memory: MemorySettings, device: torch.device, *,
                    chatter: bool = False, empty: bool = False,
                    quantize: Callable[..., int] = quantize_bnb) -> Components:
    """Load `model` and apply every memory knob of `memory`; all base weights frozen. `chatter`: let the
    libraries print their own loading messages. `empty`: build from the configs on the meta device and leave it
    there (no weights read or allocated), with `quantize` standing in for bitsandbytes, which needs real tensors:
    the memory simulation's way in."""
    with library_chatter(chatter):
        return _load_components(model, memory, device, empty, quantize)


def _load_components(model: str, memory: MemorySettings, device: torch.device, empty: bool,
                     quantize: Callable[..., int]) -> Components:
    path = resolve_model(model)
    family = detect_family(path)
    dtype = compute_dtype(memory.weights, device)
    if empty:
        with torch.device("meta"):
            unet, vae, encoders, tokenizers, scheduler = _build_random(path, family)
        from .vram import config_fingerprint

        fingerprint = config_fingerprint(path)
    else:
        unet, vae, encoders, tokenizers, scheduler = _load(path, family, dtype)
        fingerprint = file_fingerprint(path / "unet") or unet_fingerprint(unet)
    notes = [note for note in (emulated_bf16_note(dtype, device),) if note]

    for module in (unet, vae, *encoders):
        module.requires_grad_(False)
        module.eval()

    cast_frozen(unet, dtype)
    if memory.storage == "fp8":
        store_fp8(unet)
    elif memory.storage in ("nf4", "int8"):
        quantize(unet, memory.storage, dtype, device)
    if not empty:
        unet.to(device)

    vae_dtype = torch.float32 if (family.vae_fp16_unsafe and dtype == torch.float16) else dtype
    if vae_dtype != dtype:
        notes.append("VAE kept in fp32: the stock SDXL VAE overflows in fp16")
    # The VAE and text encoders run outside autocast, where CUDA's norm kernels take one dtype for input and
    # weight: each holds a single dtype, whole (cast_frozen's fp32 norms are for the UNet, which autocast feeds).
    vae.to(vae_dtype)
    for encoder in encoders:
        encoder.to(dtype)
    if memory.vae_slicing:
        vae.enable_slicing()
    if memory.vae_tiling:
        # diffusers only tiles images larger than sample_size (512/768/1024), i.e. never at native resolution:
        # halve the tile so the decode peak (SDXL's largest on small presets) really shrinks.
        vae.enable_tiling()
        vae.tile_sample_min_size = int(vae.config.sample_size) // 2
        vae.tile_latent_min_size = vae.tile_sample_min_size // 2 ** (len(vae.config.block_out_channels) - 1)

    _set_attention(unet, memory.attention)
    if memory.checkpointing:
        unet.enable_gradient_checkpointing()
    return Components(
        family=family, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers, scheduler=scheduler,
        device=device, dtype=dtype, model_id=model, fingerprint=fingerprint, memory=memory, notes=notes,
        zero_uncond=family.zero_uncond and bool(model_index(path).get("force_zeros_for_empty_prompt", True)),
    )


def _set_attention(unet: nn.Module, attention: str) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if attention == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as exc:
            raise ConfigError(f"memory.attention = 'xformers' is unavailable ({exc}); use 'sdpa' or "
                              "pip install 'imagic-lite[xformers]'") from None
    elif attention == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
    else:
        unet.set_attn_processor(AttnProcessor())


# ---------------------------------------------------------------------------------------------------------------
# Encoding: the input latent and the text conditioning


@dataclass(frozen=True)
class Encoded:
    """What the stages need from the encoders; the encoders themselves can then leave the accelerator."""

    latent: torch.Tensor  # (1, C, h, w), already multiplied by the VAE scaling factor
    e_tgt: Cond
    uncond: Cond  # the empty prompt, for classifier-free guidance in stage C
    truncated: str  # words of the prompt beyond the encoder's token limit ("" if none)


def _place(module: nn.Module, device: torch.device) -> None:
    module.to(device)


def encode_text(c: Components, prompt: str) -> tuple[Cond, str]:
    """Encode one prompt; return the conditioning and the words that did not fit the token limit."""
    return ENCODERS[c.family.name](c, prompt)


def encode_uncond(c: Components) -> Cond:
    """The unconditional side of classifier-free guidance: the empty prompt's encoding, or zeros (sequence and
    pooled) where the model says force_zeros_for_empty_prompt, as diffusers' SDXL pipeline does."""
    cond, _ = encode_text(c, "")
    if not c.zero_uncond:
        return cond
    return Cond(torch.zeros_like(cond.embeds), None if cond.pooled is None else torch.zeros_like(cond.pooled))


def _truncated_words(tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt, truncation=False, add_special_tokens=False).input_ids
    limit = tokenizer.model_max_length - 2
    if len(ids) <= limit:
        return ""
    return tokenizer.decode(ids[limit:]).strip()


def _tokens(tokenizer, prompt: str, device: torch.device) -> torch.Tensor:
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


@torch.no_grad()
def _encode_sd(c: Components, prompt: str) -> tuple[Cond, str]:
    encoder, tokenizer = c.text_encoders[0], c.tokenizers[0]
    device = next(encoder.parameters()).device
    hidden = encoder(_tokens(tokenizer, prompt, device))[0]
    return Cond(hidden.float().to(c.host)), _truncated_words(tokenizer, prompt)


@torch.no_grad()
def _encode_sdxl(c: Components, prompt: str) -> tuple[Cond, str]:
    # SDXL: penultimate hidden states of both encoders, concatenated; pooled output of the second.
    states, pooled = [], None
    for encoder, tokenizer in zip(c.text_encoders, c.tokenizers, strict=True):
        device = next(encoder.parameters()).device
        out = encoder(_tokens(tokenizer, prompt, device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (the last encoder)
    embeds = torch.cat(states, dim=-1)
    return Cond(embeds.float().to(c.host), pooled.float().to(c.host)), _truncated_words(c.tokenizers[0], prompt)


ENCODERS: dict[str, Callable[[Components, str], tuple[Cond, str]]] = {"sd": _encode_sd, "sdxl": _encode_sdxl}


def unet_kwargs(c: Components, cond: Cond, height: int, width: int,
                original: tuple[int, int] | None = None) -> dict:
    """Keyword arguments for one UNet call; SDXL adds pooled text and the size/crop time ids.

    SDXL was trained knowing each photo's size before resizing (`original`, height x width) and its crop: we cut
    only the few pixels that give the working size's aspect (images.fit_crop), so the crop is given as (0, 0) and
    the original size is the photo's own, as the issue and SDXL's paper ask. Without it (None) the working size
    stands in, which tells SDXL the photo was small."""
    kwargs = {"encoder_hidden_states": cond.embeds}
    if c.family.pooled:
        n = cond.embeds.shape[0]
        orig_h, orig_w = original or (height, width)
        time_ids = torch.tensor([[orig_h, orig_w, 0, 0, height, width]], dtype=cond.embeds.dtype)
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": time_ids.repeat(n, 1).to(c.device)}
    return kwargs


@torch.no_grad()
def encode(c: Components, pixels: torch.Tensor, prompt: str) -> Encoded:
    """Encode the image once (the cached latent) and the prompts; then move the encoders off the accelerator.

    With offloaded encoders the UNet waits on the host meanwhile, so encode's peak is the encoders' own, not theirs
    plus the UNet's (the simulation put SD 1.5's 8gb encode at 2.36 GiB, above every stage after it)."""
    if not prompt.strip():
        raise InputError("the prompt is empty; describe the edited image, e.g. \"a dog lying down\"")
    unet_aside = c.memory.offload_encoders and c.offloads
    if unet_aside:
        c.unet.to(c.host)
    for module in (c.vae, *c.text_encoders):
        _place(module, c.device)
    vae_dtype = next(c.vae.parameters()).dtype
    posterior = c.vae.encode(pixels.to(c.device, vae_dtype)).latent_dist
    latent = (posterior.mean * c.scaling_factor).float()  # the mean: deterministic, as the paper's fixed x
    e_tgt, truncated = encode_text(c, prompt)
    uncond = encode_uncond(c)
    if unet_aside:
        for module in (c.vae, *c.text_encoders):
            _place(module, c.host)
        torch.cuda.empty_cache()
        c.unet.to(c.device)
    return Encoded(latent=latent, e_tgt=e_tgt, uncond=uncond, truncated=truncated)


@contextlib.contextmanager
def vae_turn(c: Components) -> Iterator[torch.dtype]:
    """The VAE on the device for a decode (or the eta judge's encode) after sampling: the UNet steps aside meanwhile
    when `sample_offload` is on, and the VAE goes back to the host after it when the encoders are offloaded.
    Yields the VAE's dtype (its inputs must match it outside autocast)."""
    aside = c.memory.sample_offload and c.offloads
    if aside:
        c.unet.to(c.host)
        torch.cuda.empty_cache()
    _place(c.vae, c.device)
    try:
        yield next(c.vae.parameters()).dtype
    finally:
        if c.memory.offload_encoders and c.offloads:
            _place(c.vae, c.host)
        if aside:
            c.unet.to(c.device)


@torch.no_grad()
def decode(c: Components, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> pixels in [-1, 1] on the CPU (`vae_turn` says who is on the device meanwhile)."""
    with vae_turn(c) as vae_dtype:
        return c.vae.decode(latents.to(c.device, vae_dtype) / c.scaling_factor).sample.float().to(c.host)
