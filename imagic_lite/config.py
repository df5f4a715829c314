"""Settings as data: one frozen dataclass per stage and one for memory, grouped into a Preset.

Presets are sparse TOML files; precedence is defaults < preset < model recommendations < config file < flags.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # here, not in models.py: --help shows it, no torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FORMAT_VERSION = 1
WEIGHT_DTYPES = ("half", "fp32", "fp16", "bf16")  # half: bf16 where the card has it, else fp16
STORAGES = ("none", "fp8", "nf4", "int8")
ATTENTIONS = ("sdpa", "xformers", "default")
TUNE_MODES = ("lora", "full")
OPTIMIZERS = ("adamw", "adamw8bit")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass(frozen=True)
class EmbedSettings:
    """Stage A: optimise e_opt from e_tgt with the UNet frozen."""

    steps: int = 500  # diffusers community Imagic pipeline: text_embedding_optimization_steps=500
    lr: float = 1e-3  # paper (Kawar et al. 2023, sec. 4) and every public port: Adam, 1e-3
    noise_draws: int = 1  # noise/timestep draws per step, batched through one UNet call (Forgedit batches 10)

    def __post_init__(self) -> None:
        _check(self.steps >= 0, f"embed.steps must be >= 0, got {self.steps}")
        _check(0 < self.lr < 1, f"embed.lr must be in (0, 1), got {self.lr}")
        _check(1 <= self.noise_draws <= 64, f"embed.noise_draws must be 1..64, got {self.noise_draws}")


@dataclass(frozen=True)
class TuneSettings:
    """Stage B: fine-tune the denoiser on the input with e_opt fixed (LoRA, or full as in the paper)."""

    mode: str = "lora"
    steps: int = 1000  # diffusers community Imagic pipeline: model_fine_tuning_optimization_steps=1000
    lora_lr: float = 1e-4  # common LoRA rate for SD 1.x (kohya/diffusers examples use 1e-4)
    full_lr: float = 2e-6  # diffusers community Imagic pipeline: diffusion_model_learning_rate=2e-6
    rank: int = 4
    alpha: float = 4.0
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    optimizer: str = "adamw"
    noise_draws: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        _check(self.mode in TUNE_MODES, f"tune.mode must be one of {', '.join(TUNE_MODES)}, got {self.mode!r}")
        _check(self.steps >= 0, f"tune.steps must be >= 0, got {self.steps}")
        _check(0 < self.lora_lr < 1, f"tune.lora_lr must be in (0, 1), got {self.lora_lr}")
        _check(0 < self.full_lr < 1, f"tune.full_lr must be in (0, 1), got {self.full_lr}")
        _check(1 <= self.rank <= 256, f"tune.rank must be 1..256, got {self.rank}")
        _check(self.alpha > 0, f"tune.alpha must be > 0, got {self.alpha}")
        _check(len(self.targets) > 0, "tune.targets must name at least one module")
        _check(self.optimizer in OPTIMIZERS, f"tune.optimizer must be one of {', '.join(OPTIMIZERS)}")
        _check(1 <= self.noise_draws <= 64, f"tune.noise_draws must be 1..64, got {self.noise_draws}")

    @property
    def lr(self) -> float:
        return self.lora_lr if self.mode == "lora" else self.full_lr


@dataclass(frozen=True)
class SampleSettings:
    """Stage C: sample from eta*e_tgt + (1-eta)*e_opt with classifier-free guidance."""

    steps: int = 50  # DDIM steps, diffusers community Imagic pipeline default
    guidance: float = 7.5  # Stable Diffusion's usual CFG scale, used by the public Imagic ports
    etas: tuple[float, ...] = (0.6, 0.7, 0.8, 0.9, 1.0)  # paper fig. 7: the edit appears for eta ~0.6-0.8
    seeds: tuple[int, ...] = (0,)
    batch: int = 1  # images per UNet call (x2 with guidance)

    def __post_init__(self) -> None:
        object.__setattr__(self, "etas", tuple(float(e) for e in self.etas))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        _check(1 <= self.steps <= 1000, f"sample.steps must be 1..1000, got {self.steps}")
        _check(0 <= self.guidance <= 50, f"sample.guidance must be 0..50, got {self.guidance}")
        _check(len(self.etas) > 0, "at least one eta is needed")
        _check(all(-1.0 <= e <= 3.0 for e in self.etas), f"etas must be within -1..3, got {list(self.etas)}")
        _check(len(self.seeds) > 0, "at least one seed is needed")
        _check(all(0 <= s < 2**63 for s in self.seeds), "seeds must be integers in 0..2**63-1")
        _check(1 <= self.batch <= 64, f"sample.batch must be 1..64, got {self.batch}")


@dataclass(frozen=True)
class MemorySettings:
    """Where the bytes go: dtypes, quantized storage, checkpointing, attention and offloading."""

    weights: str = "half"  # dtype of frozen weights and of the compute (autocast); trainables stay fp32
    storage: str = "none"  # frozen base stored as fp8 (all layers) or nf4/int8 (Linear layers, bitsandbytes)
    checkpointing: bool = False  # gradient checkpointing in stages A and B
    attention: str = "sdpa"
    offload_encoders: bool = True  # VAE and text encoders leave the accelerator after encoding
    vae_slicing: bool = False
    vae_tiling: bool = False
    sample_offload: bool = False  # UNet leaves the accelerator while the VAE decodes

    def __post_init__(self) -> None:
        _check(self.weights in WEIGHT_DTYPES, f"memory.weights must be one of {', '.join(WEIGHT_DTYPES)}")
        _check(self.storage in STORAGES, f"memory.storage must be one of {', '.join(STORAGES)}")
        _check(self.attention in ATTENTIONS, f"memory.attention must be one of {', '.join(ATTENTIONS)}")


@dataclass(frozen=True)
class Preset:
    """A named bundle of settings for one card size (or for the CPU, or the paper's reference)."""

    name: str = "custom"
    description: str = ""
    vram_gb: float | None = None  # the smallest card it is meant for; None: never picked by --vram
    embed: EmbedSettings = field(default_factory=EmbedSettings)
    tune: TuneSettings = field(default_factory=TuneSettings)
    sample: SampleSettings = field(default_factory=SampleSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    # Per-family adjustments, e.g. {"sdxl": {"memory": {"storage": "nf4"}}}: SDXL's 2.6 B-parameter UNet needs
    # more savings on the same card. Validated at load; applied by `for_family` once the model is known.
    family: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "family"}

    def for_family(self, name: str) -> Preset:
        """These settings as they apply to a model of family `name`: its table over the plain sections.

        A resolved preset carries no family tables, so each layer's table is applied right after that layer
        (see api.resolve_settings) and a later layer's plain keys still override an earlier family table."""
        table = self.family.get(name)
        return apply_overrides(replace(self, family={}), table or {}, f"preset {self.name} [{name}.*]")


SECTIONS = {"embed": EmbedSettings, "tune": TuneSettings, "sample": SampleSettings, "memory": MemorySettings}
TOP_KEYS = {"format_version", "name", "description", "vram_gb"}
FAMILY_NAMES = ("sd", "sdxl")  # as models.FAMILIES


def _line_of(text: str, section: str | None, key: str) -> int | None:
    """Best-effort line number of `key` (inside `[section]`), since tomllib does not report positions."""
    current = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        header = re.match(r"^\[([^\]]+)\]", stripped)
        if header:
            current = header.group(1).strip()
        elif current == section and re.match(rf"^\"?{re.escape(key)}\"?\s*=", stripped):
            return number
    return None


def _where(source: str, text: str, section: str | None, key: str) -> str:
    line = _line_of(text, section, key)
    name = f"{section}.{key}" if section else key
    return f"{source}, key {name!r}" + (f", line {line}" if line else "")


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check a TOML value against a dataclass field type; TOML ints are accepted for floats."""
    typ = str(typ)
    if typ == "bool":
        _check(isinstance(value, bool), f"{where}: expected true or false, got {value!r}")
    elif typ == "int":
        _check(isinstance(value, int) and not isinstance(value, bool), f"{where}: expected an integer, got {value!r}")
    elif typ == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        _check(ok, f"{where}: expected a number, got {value!r}")
        value = float(value)
    elif typ == "str":
        _check(isinstance(value, str), f"{where}: expected a string, got {value!r}")
    elif typ.startswith("tuple["):
        _check(isinstance(value, list | tuple), f"{where}: expected a list, got {value!r}")
        element = typ[len("tuple["):].split(",")[0].strip()  # "tuple[float, ...]" -> "float"
        value = tuple(_coerce(v, element, f"{where}, item {i + 1}") for i, v in enumerate(value))
    return value


def _merge_family(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Two [family.*] tables as one, key by key (a later [sdxl.memory] storage must not drop checkpointing)."""
    merged = {section: dict(values) for section, values in old.items()}
    for section, values in new.items():
        merged[section] = {**merged.get(section, {}), **values}
    return merged


def check_resolved(preset: Preset) -> Preset:
    """Rules across sections, checked once every layer is applied (an earlier layer may be fixed by a later one)."""
    if preset.tune.mode == "full" and preset.memory.storage != "none":
        raise ConfigError(f"tune.mode = 'full' trains every UNet weight, which needs an unquantized base, but "
                          f"memory.storage = {preset.memory.storage!r} (preset {preset.name}); use --mode lora or a "
                          f"preset without quantized storage, e.g. --preset paper")
    return preset


def apply_overrides(preset: Preset, data: dict[str, Any], source: str, text: str = "") -> Preset:
    """Return `preset` with the sections/keys of a parsed TOML table applied; unknown keys are errors."""
    top: dict[str, Any] = {}
    sections = {name: getattr(preset, name) for name in SECTIONS}
    families = dict(preset.family)
    for key, value in data.items():
        if key in FAMILY_NAMES:
            where = _where(source, text, None, key)
            _check(isinstance(value, dict) and set(value) <= set(SECTIONS),
                   f"{where}: [{key}.*] may only hold {', '.join(f'[{key}.{s}]' for s in SECTIONS)} tables")
            apply_overrides(Preset(), value, f"{source} [{key}.*]", "")  # validate now, apply later
            families[key] = _merge_family(families.get(key, {}), value)
        elif key in SECTIONS:
            _check(isinstance(value, dict), f"{_where(source, text, None, key)}: expected a [{key}] table")
            known = {f.name: f.type for f in fields(SECTIONS[key])}
            changes = {}
            for sub, subvalue in value.items():
                where = _where(source, text, key, sub)
                _check(sub in known, f"{where}: unknown key (known: {', '.join(sorted(known))})")
                changes[sub] = _coerce(subvalue, known[sub], where)
            try:
                sections[key] = replace(sections[key], **changes)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
        elif key in TOP_KEYS:
            if key == "format_version":
                where = _where(source, text, None, key)
                supported = f"unsupported format_version {value!r} (this version reads {FORMAT_VERSION})"
                _check(value == FORMAT_VERSION, f"{where}: {supported}")
            elif key == "vram_gb":
                top[key] = _coerce(value, "float", _where(source, text, None, key))
            else:
                top[key] = _coerce(value, "str", _where(source, text, None, key))
        else:
            known = ", ".join(sorted(TOP_KEYS | set(SECTIONS) | set(FAMILY_NAMES)))
            raise ConfigError(f"{_where(source, text, None, key)}: unknown key (known: {known})")
    return replace(preset, **top, **sections, family=families)


def read_toml(path: Path) -> tuple[dict[str, Any], str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def preset_dir() -> Path:
    """Shipped presets: `presets/` in the source tree, installed as the package `imagic_lite.presets`."""
    source_tree = Path(__file__).resolve().parent.parent / "presets"
    if source_tree.is_dir():  # running from a checkout (editable install or tests)
        return source_tree
    return Path(str(resources.files("imagic_lite.presets")))


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.toml"))


def load_preset(name_or_path: str) -> Preset:
    """A shipped preset by name, or a TOML file by path."""
    path = Path(name_or_path)
    if not (name_or_path.endswith(".toml") or path.is_file()):
        path = preset_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {name_or_path!r}; choose one of: {', '.join(preset_names())}")
    data, text = read_toml(path)
    if "name" not in data:
        data = {**data, "name": path.stem}
    return apply_overrides(Preset(), data, str(path), text)


def all_presets() -> list[Preset]:
    return [load_preset(name) for name in preset_names()]


def preset_for_vram(gb: float) -> Preset:
    """The fastest shipped preset made for a card of `gb` GB: the largest `vram_gb` not above it."""
    candidates = [p for p in all_presets() if p.vram_gb is not None and p.vram_gb <= gb]
    if not candidates:
        smallest = min(p.vram_gb for p in all_presets() if p.vram_gb is not None)
        raise ConfigError(f"--vram {gb:g} is below the smallest preset ({smallest:g} GB); try --vram {smallest:g}")
    return max(candidates, key=lambda p: p.vram_gb)
