"""The bundle format: one `NAME.imagic.safetensors` holding a run's result (e_tgt, e_opt, and a LoRA or full UNet).

It owns saving, validating a file from a stranger before anything in it is trusted, checking it against a loaded
model, putting its weights into the UNet, and exporting the LoRA in the diffusers and kohya layouts.
"""

from __future__ import annotations

import json
import math
import re
import stat
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .config import Preset, SampleSettings, apply_overrides
from .errors import BundleError, ConfigError, InputError, OutputError
from .files import atomic_path
from .models import FAMILIES, Components, Cond

FORMAT = "imagic-lite.bundle"
FORMAT_VERSION = "1"
SUFFIX = ".imagic.safetensors"
MAX_HEADER = 2**20  # safetensors allows 100 MB; our header is a few kB of metadata plus one line per tensor
MAX_PROMPT = 4096
MAX_SIDE = 16384
THUMB_SIDE = 128
REQUIRED_META = ("base_model", "unet_fingerprint", "family", "prediction_type", "height", "width", "prompt",
                 "preset", "settings", "tune_mode", "versions", "created")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Bytes per element of the safetensors dtypes we may meet; a name outside this table is refused outright.
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "U8": torch.uint8}
_PATH = r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*"  # a dotted module path; dots delimit, so matching stays linear
LORA_NAME = re.compile(rf"unet\.({_PATH})\.lora_([AB])\.weight")
FULL_NAME = re.compile(rf"unet_full\.({_PATH})")
SIDE = re.compile(r"[1-9][0-9]{0,4}")
MAX_ORIGINAL_SIDE = 99_999  # the photo before resizing (SDXL time ids); 40 MP allows long thin panoramas
# Size caps, one rule for the writer and the loader (`size_cap`): a file from a stranger must not make us read
# gigabytes, yet every bundle we write must load. A full-mode bundle is the whole UNet in fp16, so its cap follows
# the largest UNet of the family (parameters of the shipped arch configs, checked by tests/test_bundle.py: SD 2.x
# 865.9 M is the larger "sd" UNet, SDXL 2567.5 M, i.e. a 5.1 GB bundle), plus 1 % for variants such as a 9-channel
# inpainting conv_in, plus room for the embeddings, thumbnail and header. A LoRA bundle is a few MB at the ranks
# people use; 4 GiB allows any sane rank.
FULL_UNET_PARAMS = {"sd": 865_910_724, "sdxl": 2_567_463_684}
LORA_CAP = 4 * 2**30
EXTRAS_CAP = 64 * 2**20  # embeddings (SDXL: 2 x 631 kB), thumbnail (49 kB), header (at most MAX_HEADER)


@dataclass
class Bundle:
    """One Imagic result: the two embeddings, the tuned weights (fp16 as stored) and the run's metadata."""

    e_tgt: Cond
    e_opt: Cond
    weights: dict[str, torch.Tensor]  # PEFT LoRA keys (no "unet." prefix) or full UNet state-dict keys
    mode: str  # "lora" | "full"
    lora: dict | None  # {"r", "lora_alpha", "target_modules"} for lora mode
    meta: dict[str, str]
    thumbnail: Image.Image | None = None


@dataclass(frozen=True)
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


# ---------------------------------------------------------------------------------------------------------------
# Validation: header bytes -> metadata -> tensor layout, each refusing with a one-line message


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise BundleError(f"the header names {sorted(k for k in set(keys) if keys.count(k) > 1)[0]!r} twice")
    return dict(pairs)


def size_cap(mode: str, family: str) -> int:
    """The largest bundle file of this mode and family that `load_bundle` reads and `save_bundle` writes."""
    if mode == "full":
        return int(FULL_UNET_PARAMS[family] * 2 * 1.01) + EXTRAS_CAP
    return LORA_CAP


def _largest_cap() -> int:
    return max(size_cap(mode, family) for mode in ("lora", "full") for family in FULL_UNET_PARAMS)


def _check_size(size: int, mode: str, family: str, max_bytes: int | None, what: str) -> None:
    cap = size_cap(mode, family) if max_bytes is None else max_bytes
    if size > cap:
        raise BundleError(f"{what} is {size / 2**30:.2f} GiB ({size} bytes), over the {cap}-byte limit for a "
                          f"{family} {mode}-mode bundle")


def _read_header(path: Path, max_bytes: int) -> tuple[dict[str, str], dict[str, _Entry]]:
    """Parse and bound the safetensors header ourselves, so a pickle or a huge header never reaches a parser."""
    try:
        info = path.stat()
    except OSError as exc:
        raise BundleError(f"cannot read bundle {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise BundleError(f"{path} is not a regular file")
    size = info.st_size
    if size > max_bytes:
        raise BundleError(f"{path} is {size} bytes, over the {max_bytes}-byte limit for a bundle")
    if size < 8:
        raise BundleError(f"{path} is not a bundle: {size} bytes is too short for a safetensors file")
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        if length < 2 or length > MAX_HEADER:
            raise BundleError(f"{path} is not a bundle: not a safetensors file (header length {length}; a pickled "
                              ".ckpt/.bin/.pt file looks like this and is never opened)")
        if 8 + length > size:
            raise BundleError(f"{path} is truncated: its header needs {length} bytes, the file has {size - 8}")
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BundleError(f"{path} is not a bundle: its safetensors header is not valid JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise BundleError(f"{path} is not a bundle: its header has no metadata")
    meta = header.pop("__metadata__")
    if not all(isinstance(v, str) for v in meta.values()):
        raise BundleError(f"{path}: a metadata value is not a string")
    spans = []
    for name, spec in header.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"} or not \
                isinstance(spec["dtype"], str) or spec["dtype"] not in DTYPE_SIZES or not _ints(spec["shape"]) \
                or _offsets(spec) is None:
            raise BundleError(f"{path}: tensor {name[:80]!r} has a malformed header entry")
        nbytes = math.prod(spec["shape"]) * DTYPE_SIZES[spec["dtype"]]
        spans.append((*_offsets(spec), name, _Entry(spec["dtype"], tuple(spec["shape"]), nbytes)))
    entries, end = {}, 0
    for begin, stop, name, entry in sorted(spans, key=lambda s: s[:2]):
        if begin != end or stop - begin != entry.nbytes:  # contiguous, no overlap, size = shape x dtype
            raise BundleError(f"{path}: tensor {name[:80]!r} has inconsistent data offsets")
        entries[name], end = entry, stop
    if 8 + length + end != size:
        raise BundleError(f"{path} is truncated or has trailing bytes: the header accounts for {8 + length + end} "
                          f"bytes, the file has {size}")
    return meta, entries


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _offsets(spec: Any) -> tuple[int, int] | None:
    offsets = spec.get("data_offsets") if isinstance(spec, dict) else None
    if _ints(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]:
        return offsets[0], offsets[1]
    return None


def _json(meta: dict[str, str], key: str) -> dict:
    try:
        value = json.loads(meta[key])
    except (ValueError, RecursionError):
        raise BundleError(f"metadata {key!r} is not valid JSON") from None
    if not isinstance(value, dict):
        raise BundleError(f"metadata {key!r} must be a JSON object")
    return value


def _check_lora_config(config: Any) -> dict:
    """Exactly the three fields PEFT needs; target_modules a list (PEFT reads a bare string as a regex)."""
    if not isinstance(config, dict) or set(config) != {"r", "lora_alpha", "target_modules"}:
        raise BundleError("metadata 'lora_config' must have exactly the keys r, lora_alpha, target_modules")
    r, alpha, targets = config["r"], config["lora_alpha"], config["target_modules"]
    if type(r) is not int or not 1 <= r <= 1024:
        raise BundleError(f"lora_config r must be an integer 1..1024, got {r!r:.20}")
    if type(alpha) not in (int, float) or not 0 < alpha <= 1e6:  # also refuses NaN, inf and 10**400
        raise BundleError(f"lora_config lora_alpha must be a positive number, got {alpha!r:.20}")
    if not isinstance(targets, list) or not 0 < len(targets) <= 64 or \
            not all(isinstance(t, str) and re.fullmatch(_PATH, t) for t in targets):
        raise BundleError("lora_config target_modules must be a list of 1..64 module names like 'to_q'")
    return {"r": r, "lora_alpha": alpha, "target_modules": list(targets)}


def _check_meta(meta: dict[str, str]) -> tuple[str, str, dict | None]:
    """Validate the metadata; return (mode, family, lora config)."""
    if meta.get("format") != FORMAT:
        found = meta.get("format")
        raise BundleError("not an imagic-lite bundle (" + (f"format {found[:40]!r}" if found else "no 'format'")
                          + " in its metadata; a plain LoRA file is used directly, not through `edit`)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"bundle format version {meta.get('format_version', '?')[:20]!r} is not one this "
                          f"imagic-lite reads (it reads {FORMAT_VERSION}); a newer imagic-lite may")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise BundleError(f"bundle metadata lacks {', '.join(missing)}")
    for key, value in meta.items():  # `info` prints these: no terminal escape sequences from a stranger
        if any(unicodedata.category(ch) == "Cc" and ch not in "\n\t" for ch in key + value):
            raise BundleError(f"metadata {key[:40]!r} contains control characters")
    if meta["family"] not in FAMILIES:
        raise BundleError(f"unknown model family {meta['family'][:20]!r} (known: {', '.join(FAMILIES)})")
    if meta["prediction_type"] not in PREDICTION_TYPES:
        raise BundleError(f"unknown prediction type {meta['prediction_type'][:20]!r}")
    for key in ("height", "width"):
        if not SIDE.fullmatch(meta[key]) or int(meta[key]) > MAX_SIDE:
            raise BundleError(f"metadata {key} must be a whole number of pixels 1..{MAX_SIDE}")
    for key in ("original_height", "original_width"):  # optional: bundles before SDXL time ids lack them
        if key in meta and not (SIDE.fullmatch(meta[key]) and int(meta[key]) <= MAX_ORIGINAL_SIDE):
            raise BundleError(f"metadata {key} must be a whole number of pixels 1..{MAX_ORIGINAL_SIDE}")
    if ("original_height" in meta) != ("original_width" in meta):
        raise BundleError("metadata has only one of original_height / original_width")
    if len(meta["prompt"]) > MAX_PROMPT:
        raise BundleError(f"the prompt in the bundle is longer than {MAX_PROMPT} characters")
    try:
        datetime.fromisoformat(meta["created"])
    except ValueError:
        raise BundleError("metadata 'created' is not an ISO 8601 date") from None
    for key in ("settings", "versions"):
        _json(meta, key)
    stored_sample(meta)
    mode = meta["tune_mode"]
    if mode == "lora":
        if "lora_config" not in meta:
            raise BundleError("a lora-mode bundle needs 'lora_config' metadata")
        return mode, meta["family"], _check_lora_config(_json(meta, "lora_config"))
    if mode != "full":
        raise BundleError(f"unknown tune mode {mode[:20]!r} (known: lora, full)")
    return mode, meta["family"], None


def stored_sample(meta: dict[str, str]) -> SampleSettings:
    """The stage C settings the run used, which `edit` starts from; checked like a TOML [sample] table.

    Keys this version does not know are skipped, so a newer imagic-lite's bundle still edits."""
    sample = _json(meta, "settings").get("sample", {})
    if not isinstance(sample, dict):
        raise BundleError("metadata 'settings' has a 'sample' that is not a JSON object")
    known = {k: v for k, v in sample.items() if k in SampleSettings.__dataclass_fields__}
    try:
        return apply_overrides(Preset(), {"sample": known}, "metadata 'settings'").sample
    except ConfigError as exc:
        raise BundleError(str(exc)) from None


def _check_layout(entries: dict[str, _Entry], mode: str, family: str, lora: dict | None) -> None:
    """Every name expected, every dtype the one we write, every shape consistent with the others and with r."""
    pooled = FAMILIES[family].pooled
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, e in entries.items():
        shown = repr(name[:120])
        if name in ("e_tgt", "e_opt", "e_tgt_pooled", "e_opt_pooled") and (pooled or "pooled" not in name):
            want, ndim = "F32", 2 if "pooled" in name else 3
        elif name == "thumbnail":
            want, ndim = "U8", 3
        elif mode == "lora" and (match := LORA_NAME.fullmatch(name)):
            want, ndim = "F16", len(e.shape)
            modules.setdefault(match[1], {})[match[2]] = e.shape
        elif mode == "full" and FULL_NAME.fullmatch(name):
            want, ndim = "F16", len(e.shape)
        else:
            raise BundleError(f"unexpected tensor {shown} in a {family} {mode}-mode bundle")
        if e.dtype != want:
            raise BundleError(f"tensor {shown} has dtype {e.dtype}, a bundle stores it as {want}")
        if len(e.shape) != ndim or (name != "thumbnail" and 0 in e.shape):
            raise BundleError(f"tensor {shown} has shape {e.shape}")
    names = ["e_tgt", "e_opt"] + (["e_tgt_pooled", "e_opt_pooled"] if pooled else [])
    if any(n not in entries for n in names):
        raise BundleError(f"the bundle lacks {[n for n in names if n not in entries][0]}")
    for a, b in zip(names[::2], names[1::2], strict=True):
        if entries[a].shape != entries[b].shape or entries[a].shape[0] != 1:
            raise BundleError(f"{a} {entries[a].shape} and {b} {entries[b].shape} must be equal with batch 1")
    thumb = entries["thumbnail"].shape if "thumbnail" in entries else (1, 1, 3)
    if not (0 < thumb[0] <= THUMB_SIDE and 0 < thumb[1] <= THUMB_SIDE and thumb[2] == 3):
        raise BundleError(f"thumbnail shape {thumb} is not (H, W, 3) with sides up to {THUMB_SIDE}")
    if mode == "full" and not any(FULL_NAME.fullmatch(n) for n in entries):
        raise BundleError("a full-mode bundle holds no UNet weights")
    if mode == "lora":
        if not modules:
            raise BundleError("a lora-mode bundle holds no LoRA weights")
        r = lora["r"]
        for module, pair in modules.items():
            a, b = pair.get("A"), pair.get("B")
            # Linear: A (r, in), B (out, r); Conv2d: A (r, in, kh, kw), B (out, r, 1, 1)
            fits = a is not None and b is not None and len(a) in (2, 4) and len(b) == len(a) and a[0] == r \
                and b[1] == r and b[2:] in ((), (1, 1))
            if not fits:
                raise BundleError(f"LoRA {module[:100]!r}: lora_A {a} / lora_B {b} do not fit rank r={r}")


# ---------------------------------------------------------------------------------------------------------------
# Save and load


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("imagic-lite", "torch", "diffusers", "peft"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "unknown"
    return found


def _tensors(bundle: Bundle, thumbnail: bool) -> dict[str, torch.Tensor]:
    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32).contiguous().clone()

    tensors = {"e_tgt": f32(bundle.e_tgt.embeds), "e_opt": f32(bundle.e_opt.embeds)}
    for name, cond in (("e_tgt", bundle.e_tgt), ("e_opt", bundle.e_opt)):
        if cond.pooled is not None:
            tensors[f"{name}_pooled"] = f32(cond.pooled)
    prefix = "unet." if bundle.mode == "lora" else "unet_full."
    for key, value in bundle.weights.items():
        tensors[prefix + key] = value.detach().to("cpu", torch.float16).contiguous()
    if thumbnail and bundle.thumbnail is not None:
        small = bundle.thumbnail.convert("RGB")
        small.thumbnail((THUMB_SIDE, THUMB_SIDE))
        tensors["thumbnail"] = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).reshape(
            small.height, small.width, 3)
    return tensors


def save_bundle(path: str | Path, bundle: Bundle, *, thumbnail: bool = True) -> int:
    """Write `bundle` atomically; refuse anything `load_bundle` would refuse. Returns the bytes written."""
    from safetensors.torch import save_file

    meta = dict(bundle.meta) | {"format": FORMAT, "format_version": FORMAT_VERSION, "tune_mode": bundle.mode}
    meta.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    meta.setdefault("versions", json.dumps(_versions()))
    if bundle.lora is not None:
        meta["lora_config"] = json.dumps(_check_lora_config(dict(bundle.lora)))
    if not all(isinstance(v, str) for v in meta.values()):
        raise BundleError("bundle metadata values must be strings")
    mode, family, lora = _check_meta(meta)
    tensors = _tensors(bundle, thumbnail)
    _check_layout({k: _Entry(_name(v.dtype), tuple(v.shape), 0) for k, v in tensors.items()}, mode, family, lora)
    _check_finite(tensors)  # fp16 overflows to inf: a file we would refuse to load is never written
    fix = ("lower tune.rank or name fewer tune.targets" if mode == "lora" else
           f"this UNet is larger than any {family} UNet imagic-lite knows, so the file could not be loaded back")
    try:
        data = sum(t.numel() * t.element_size() for t in tensors.values())
        _check_size(data, mode, family, None, "the bundle's tensor data")  # before writing gigabytes
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
            _check_size(tmp.stat().st_size, mode, family, None, "the bundle")  # the loader's exact test
    except BundleError as exc:
        raise BundleError(f"{exc}; nothing was written ({fix})") from None
    return Path(path).stat().st_size


def _name(dtype: torch.dtype) -> str:
    return {v: k for k, v in TORCH_DTYPES.items()}.get(dtype, str(dtype))


def _check_finite(tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise BundleError(f"tensor {name[:120]!r} contains NaN or Inf values")


def _validated_header(path: Path, max_bytes: int | None) -> tuple[dict[str, str], dict[str, _Entry], tuple]:
    """Every check that needs no tensor data: size, header, metadata, names, dtypes, shapes.

    The size is bounded twice: by the largest cap before the header is parsed, by the cap of the mode and family
    the metadata names once it is (`max_bytes` replaces both)."""
    meta, entries = _read_header(path, _largest_cap() if max_bytes is None else max_bytes)
    try:
        mode, family, lora = _check_meta(meta)
        _check_layout(entries, mode, family, lora)
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None
    _check_size(path.stat().st_size, mode, family, max_bytes, str(path))
    return meta, entries, (mode, family, lora)


def load_bundle(path: str | Path, *, max_bytes: int | None = None) -> Bundle:
    """Read and validate a bundle without any model; nothing is unpickled or executed. Files over `size_cap` for
    their mode and family (or over `max_bytes`) are refused before any tensor is read."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    meta, entries, (mode, family, lora) = _validated_header(path, max_bytes)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in entries}
            reread = f.metadata()
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BundleError(f"{path} is not a readable safetensors file: {str(exc).splitlines()[0][:200]}") from None
    changed = reread != meta or any(tensors[k].dtype != TORCH_DTYPES[e.dtype] or tuple(tensors[k].shape) != e.shape
                                    for k, e in entries.items())
    if changed:
        raise BundleError(f"{path} changed while it was being read")
    try:
        _check_finite(tensors)
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None
    pooled = FAMILIES[family].pooled
    cond = {n: Cond(tensors[f"e_{n}"], tensors[f"e_{n}_pooled"] if pooled else None) for n in ("tgt", "opt")}
    prefix = "unet." if mode == "lora" else "unet_full."
    weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    thumb = tensors.get("thumbnail")
    if thumb is not None:
        thumb = Image.frombytes("RGB", (thumb.shape[1], thumb.shape[0]), thumb.numpy().tobytes())
    meta = {k: v for k, v in meta.items() if k not in ("format", "format_version")}
    return Bundle(cond["tgt"], cond["opt"], weights, mode, lora, meta, thumb)


def describe(path: str | Path, *, max_bytes: int | None = None) -> dict[str, Any]:
    """What `imagic-lite info` shows, from the validated header alone (no tensor data is read)."""
    path = Path(path)
    meta, entries, _ = _validated_header(path, max_bytes)
    rows = [(name, e.dtype, e.shape, e.nbytes) for name, e in entries.items()]
    groups: dict[str, dict[str, Any]] = {}
    for name, e in entries.items():  # hundreds of LoRA tensors read better as a few groups
        match = LORA_NAME.fullmatch(name)
        key = f"unet lora_{match[2]}" if match else "unet_full" if name.startswith("unet_full.") else name
        group = groups.setdefault(key, {"group": key, "count": 0, "dtype": e.dtype, "shape": e.shape, "bytes": 0})
        group["count"] += 1
        group["bytes"] += e.nbytes
    thumbnail = list(entries["thumbnail"].shape) if "thumbnail" in entries else None
    return {"path": str(path), "file_bytes": path.stat().st_size, "metadata": meta, "tensors": rows,
            "groups": list(groups.values()), "tensor_bytes": sum(e.nbytes for e in entries.values()),
            "thumbnail": thumbnail, "privacy": privacy_note(thumbnail is not None)}


def privacy_note(thumbnail: bool) -> str:
    """What sharing a bundle gives away: e_opt and the tuned weights were fit to the photo, so eta 0 redraws it."""
    held = ("a thumbnail of the input photo, and its e_opt and tuned weights" if thumbnail else
            "no thumbnail, but its e_opt and tuned weights")
    return (f"this bundle holds {held} reproduce the photo at eta 0: sharing the bundle (or an export of it) "
            "shares the photo")


# ---------------------------------------------------------------------------------------------------------------
# A bundle against a loaded model


def lora_shapes(unet: torch.nn.Module, config: dict) -> dict[str, tuple[int, ...]]:
    """The PEFT key -> shape an adapter of `config` would have on `unet`, worked out without adding one."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    peft_config = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"],
                             target_modules=list(config["target_modules"]))
    r, shapes = config["r"], {}
    for name, module in unet.named_modules():
        if not name or not check_target_module_exists(peft_config, name):
            continue
        layer = getattr(module, "base_layer", module)  # a PEFT wrapper from an earlier adapter
        if isinstance(layer, torch.nn.Linear):
            a, b = (r, layer.in_features), (layer.out_features, r)
        elif isinstance(layer, torch.nn.Conv2d):
            a, b = (r, layer.in_channels, *layer.kernel_size), (layer.out_channels, r, 1, 1)
        else:
            raise BundleError(f"LoRA target {name!r} is a {type(layer).__name__}, which bundles do not support")
        shapes |= {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b}
    return shapes


def check_compatible(bundle: Bundle, c: Components, *, force: bool = False) -> list[str]:
    """Refuse a bundle made for another model; with `force`, identity mismatches become the returned warnings.

    Shape mismatches stay errors even with `force`: such weights cannot be loaded at all."""
    meta = bundle.meta
    soft: list[str] = []
    if meta.get("family") != c.family.name:
        soft.append(f"the bundle is for a {meta.get('family')} model, the loaded model is {c.family.name}")
    if meta.get("unet_fingerprint") != c.fingerprint:
        soft.append(f"the bundle was made with {meta.get('base_model')!r} (UNet fingerprint "
                    f"{meta.get('unet_fingerprint')}), the loaded {c.model_id!r} has fingerprint {c.fingerprint}")
    if meta.get("prediction_type") != c.prediction_type:
        soft.append(f"the bundle was made with prediction type {meta.get('prediction_type')}, the loaded model "
                    f"uses {c.prediction_type}")

    hard: list[str] = []
    tokens, dim = c.tokenizers[0].model_max_length, c.unet.config.cross_attention_dim
    if tuple(bundle.e_opt.embeds.shape) != (1, tokens, dim):
        hard.append(f"embeddings are {tuple(bundle.e_opt.embeds.shape)}, the model needs (1, {tokens}, {dim})")
    if c.family.pooled:
        pooled_dim = c.text_encoders[-1].config.projection_dim
        if bundle.e_opt.pooled is None or tuple(bundle.e_opt.pooled.shape) != (1, pooled_dim):
            shape = None if bundle.e_opt.pooled is None else tuple(bundle.e_opt.pooled.shape)
            hard.append(f"pooled embeddings are {shape}, the model needs (1, {pooled_dim})")
    if int(meta["height"]) % c.multiple or int(meta["width"]) % c.multiple:
        hard.append(f"size {meta['width']}x{meta['height']} is not a multiple of {c.multiple}")
    if bundle.mode == "lora":
        expected = lora_shapes(c.unet, bundle.lora)
        got = {k: tuple(v.shape) for k, v in bundle.weights.items()}
    elif c.memory.storage != "none":
        hard.append("a full-mode bundle needs an unquantized model (memory.storage = 'none')")
        expected = got = {}
    else:
        expected = {k.replace(".base_layer", ""): tuple(v.shape) for k, v in c.unet.state_dict().items()
                    if ".lora_" not in k}
        got = {k: tuple(v.shape) for k, v in bundle.weights.items()}
    wrong = sorted(set(expected) ^ set(got)) or sorted(k for k in got if got[k] != expected[k])
    if wrong:
        hard.append(f"the tuned weights do not fit this UNet ({len(wrong)} names or shapes differ, e.g. "
                    f"{wrong[0][:100]!r})")
    if hard:
        raise BundleError("this bundle cannot work with the loaded model: " + "; ".join(hard + soft))
    if soft and not force:
        raise BundleError("; ".join(soft) + " (pass --force to use it anyway)")
    return soft


def bundle_original_size(meta: dict[str, str]) -> tuple[int, int] | None:
    """The photo's size before resizing (height, width), which SDXL's time ids condition on; None if not stored."""
    if "original_height" not in meta:
        return None
    return int(meta["original_height"]), int(meta["original_width"])


def apply_bundle(bundle: Bundle, c: Components) -> None:
    """Put the bundle's weights, rounded to fp16 exactly as stored, into the pristine `c.unet` (so re-editing
    reproduces)."""
    from .lora import load_lora
    from .pristine import before_base_change, reset_unet

    weights = {k: v.to(torch.float16) for k, v in bundle.weights.items()}
    reset_unet(c)  # a bundle never stacks on an earlier fit's or bundle's weights
    try:
        if bundle.mode == "lora":
            load_lora(c.unet, bundle.lora, weights)
        else:
            before_base_change(c)
            c.unet.load_state_dict(weights, strict=True)  # copy_ casts fp16 into each parameter's dtype
    except (ValueError, RuntimeError, KeyError) as exc:
        raise BundleError(f"the bundle's weights do not fit this UNet: {str(exc).splitlines()[0][:200]}") from None


# ---------------------------------------------------------------------------------------------------------------
# Export for other tools (never the thumbnail: a shared file should not carry the user's photo)


def export(bundle: Bundle, to: str, outdir: str | Path, *, name: str = "imagic",
           overwrite: bool = False) -> list[Path]:
    """Write the LoRA (and embeddings) as `to` = "diffusers" or "kohya" files into `outdir`; returns the paths."""
    if bundle.mode != "lora":
        raise BundleError("only LoRA bundles can be exported: this one holds a fully fine-tuned UNet (tune mode "
                          "'full'), which no LoRA tool can load")
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}", name):
        raise InputError(f"export name {name!r} must be letters, digits, '.', '_' or '-'")
    outdir = Path(outdir)
    if to == "diffusers":
        plan = {outdir / "pytorch_lora_weights.safetensors": _write_diffusers_lora,
                outdir / "embeddings.safetensors": _write_embeddings, outdir / "README.md": _write_readme}
    elif to == "kohya":
        plan = {outdir / f"{name}.safetensors": lambda b, tmp: _write_kohya(b, tmp, name)}
    else:
        raise InputError(f"export format must be 'diffusers' or 'kohya', got {to!r}")
    existing = [p for p in plan if p.exists()]
    if existing and not overwrite:
        raise OutputError(f"{existing[0]} already exists; pass --overwrite to replace it")
    for target, write in plan.items():
        with atomic_path(target) as tmp:
            write(bundle, tmp)
    return list(plan)


KOHYA_BLOCKS = ("down_blocks.", "up_blocks.", "mid_block.")  # where sd-scripts builds LoRA modules


def export_warnings(bundle: Bundle, to: str) -> list[str]:
    """What an export will not do everywhere, one line each, for the caller to show (the library never prints).

    kohya sd-scripts builds LoRA modules only inside the UNet's transformer/resnet/up/downsample blocks, so LoRA
    on conv_in, conv_out or the time/label embeddings is dropped there without a word; ComfyUI and diffusers load
    it (FIELD-NOTES §5)."""
    if to != "kohya" or bundle.mode != "lora":
        return []
    modules = sorted({k.split(".lora_")[0] for k in bundle.weights if not k.startswith(KOHYA_BLOCKS)})
    if not modules:
        return []
    shown = ", ".join(modules[:8]) + (f" and {len(modules) - 8} more" if len(modules) > 8 else "")
    return [f"kohya sd-scripts silently drops the LoRA on {shown} (outside its attention/resnet blocks); "
            "ComfyUI and diffusers load it, so the edit differs there"]


def _shareable(meta: dict[str, str]) -> dict[str, str]:
    """The metadata an export may carry: a hub id stays, a local model path shrinks to its folder name."""
    model = meta.get("base_model", "")
    local = model.startswith(("/", "~", ".", "\\")) or ":" in model or model.count("/") != 1
    names = ("prompt", "height", "width", "original_height", "original_width", "created", "prediction_type", "family")
    keep = {k: meta[k] for k in names if k in meta}
    return keep | {"base_model": Path(model).name if local else model}


def _write_diffusers_lora(bundle: Bundle, tmp: Path) -> None:
    # diffusers' own writer: `unet.<PEFT key>` plus `lora_adapter_metadata` carrying the real lora_alpha
    # (without it, diffusers assumes alpha = r).
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    StableDiffusionLoraLoaderMixin.save_lora_weights(
        tmp.parent, unet_lora_layers={k: v.to(torch.float16).contiguous() for k, v in bundle.weights.items()},
        weight_name=tmp.name, unet_lora_adapter_metadata=dict(bundle.lora))


def _write_embeddings(bundle: Bundle, tmp: Path) -> None:
    from safetensors.torch import save_file

    tensors = {"prompt_embeds": bundle.e_opt.embeds, "e_tgt": bundle.e_tgt.embeds}
    if bundle.e_opt.pooled is not None:
        tensors |= {"pooled_prompt_embeds": bundle.e_opt.pooled, "e_tgt_pooled": bundle.e_tgt.pooled}
    meta = _shareable(bundle.meta)
    meta["about"] = ("Imagic text-encoder outputs (not a textual-inversion embedding). prompt_embeds is e_opt; the "
                     f"edit conditions on eta*e_tgt + (1-eta)*e_opt (this run sampled eta {_eta_range(bundle)}), the "
                     "same mix for the pooled pair on SDXL.")
    meta["usage"] = ("pipe.load_lora_weights(folder); pipe(prompt_embeds=eta*e_tgt + (1-eta)*prompt_embeds, "
                     "negative_prompt_embeds=<the empty prompt, encoded>, height=..., width=...); see README.md")
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, str(tmp),
              metadata=meta)


def _eta_range(bundle: Bundle) -> str:
    """The etas the run sampled (the model's own defaults, or the user's), as `a-b`."""
    try:
        etas = stored_sample(bundle.meta).etas
    except BundleError:
        etas = SampleSettings().etas
    return f"{min(etas):g}-{max(etas):g}" if len(etas) > 1 else f"{etas[0]:g}"


def _base_model_code(bundle: Bundle, shared: dict[str, str]) -> tuple[str, str]:
    """(import line, from_pretrained argument) that load the bundle's base model on the reader's machine."""
    model = bundle.meta.get("base_model", "")
    if model == "shapes":  # the shipped model, wherever imagic-lite is installed
        return "from imagic_lite.models import shapes_dir\n", "shapes_dir()"
    if shared.get("base_model") != model:  # a local folder: its path is not shared
        where = "# PATH/TO: where the local folder the bundle was made on lives\n"
        return where, f'"PATH/TO/{shared.get("base_model")}"'
    return "", f'"{model}"'


def _write_readme(bundle: Bundle, tmp: Path) -> None:
    meta, sdxl = _shareable(bundle.meta), bundle.e_opt.pooled is not None
    try:
        sample = stored_sample(bundle.meta)
    except BundleError:
        sample = SampleSettings()
    extra_import, base = _base_model_code(bundle, meta)
    eta = sorted(sample.etas)[len(sample.etas) // 2]
    pipe = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    negatives = "neg, _, neg_pooled, _" if sdxl else "neg, _"
    pooled = ('    pooled_prompt_embeds=eta * emb["e_tgt_pooled"] + (1 - eta) * emb["pooled_prompt_embeds"],\n'
              "    negative_pooled_prompt_embeds=neg_pooled,\n") if sdxl else ""
    if sdxl and "original_height" in meta:  # the time ids stages A and B were trained with
        pooled += f"    original_size=({meta['original_height']}, {meta['original_width']}),\n"
    tmp.write_text(f"""# Imagic edit exported by imagic-lite

Base model `{meta.get('base_model')}`, {meta.get('width')}x{meta.get('height')} px, prompt {meta.get('prompt')!r}.
`pytorch_lora_weights.safetensors` is the UNet LoRA (diffusers layout, lora_alpha in its metadata);
`embeddings.safetensors` holds e_tgt and e_opt (as `prompt_embeds`): text-encoder outputs, not
textual-inversion tokens. eta = 0 reconstructs the photo, eta = 1 follows the prompt; this run sampled
eta {_eta_range(bundle)} with {sample.steps} DDIM steps and guidance {sample.guidance:g}.

```python
from diffusers import {pipe}
from safetensors.torch import load_file
{extra_import}
pipe = {pipe}.from_pretrained({base})
pipe.load_lora_weights("THIS_FOLDER")
emb, eta = load_file("THIS_FOLDER/embeddings.safetensors"), {eta:g}
{negatives} = pipe.encode_prompt("", device=pipe.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
image = pipe(
    prompt_embeds=eta * emb["e_tgt"] + (1 - eta) * emb["prompt_embeds"], negative_prompt_embeds=neg,
{pooled}    height={meta.get('height')}, width={meta.get('width')},
    num_inference_steps={sample.steps}, guidance_scale={sample.guidance:g},
).images[0]
```
In ComfyUI the mix is the `Conditioning (Average)` node (strength eta on e_tgt).
""")


def _write_kohya(bundle: Bundle, tmp: Path, name: str) -> None:
    """kohya/A1111/ComfyUI layout through diffusers' converter, with the real alpha (the converter writes alpha = r).

    sd-scripts trains SD 1.x/2.x on diffusers' UNet (so those keys keep diffusers paths) but SDXL on SGM's UNet, so
    SDXL keys are renamed to SGM blocks (`lora_unet_input_blocks_4_1_…`), which A1111 and Forge expect; diffusers
    has no converter that way round, only the reverse, which the tests use to check ours."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    state = convert_state_dict_to_kohya({f"unet.{k}": v.to(torch.float16).contiguous()
                                         for k, v in bundle.weights.items()})
    alpha = float(bundle.lora["lora_alpha"])
    state = {k: torch.tensor(alpha, dtype=torch.float32) if k.endswith(".alpha") else v for k, v in state.items()}
    sgm = bundle.meta.get("family") == "sdxl" and _to_sgm(state)
    save_file(sgm or state, str(tmp), metadata=_kohya_meta(bundle, name, sgm=bool(sgm)))


# SDXL's UNet in SGM's numbering (2 layers per block; input_blocks.0 is conv_in; a block with attention holds its
# resnet at .0 and transformer at .1, an up block's upsampler sits after them at .2; middle_block.0/1/2 is resnet,
# transformer, resnet): diffusers module -> SGM module.
_SGM_LAYERS = 2
_SGM_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
               "conv_shortcut": "skip_connection"}
_SGM_FIXED = {"conv_in": "input_blocks_0_0", "conv_out": "out_2", "time_embedding_linear_1": "time_embed_0",
              "time_embedding_linear_2": "time_embed_2", "add_embedding_linear_1": "label_emb_0_0",
              "add_embedding_linear_2": "label_emb_0_2"}
_DIFFUSERS_MODULE = re.compile(
    r"(?P<where>down_blocks|up_blocks)_(?P<block>\d+)_(?P<kind>resnets|attentions|downsamplers|upsamplers)_"
    r"(?P<layer>\d+)_(?P<rest>.+)|mid_block_(?P<mid_kind>resnets|attentions)_(?P<mid_layer>\d+)_(?P<mid_rest>.+)")


def _sgm_module(module: str) -> str | None:
    """`down_blocks_1_attentions_0_proj_in` -> `input_blocks_4_1_proj_in`; None for a module SGM lays out otherwise."""
    if module in _SGM_FIXED:
        return _SGM_FIXED[module]
    match = _DIFFUSERS_MODULE.fullmatch(module)
    if match is None:
        return None
    if match["mid_kind"]:
        kind, layer, rest = match["mid_kind"], int(match["mid_layer"]), match["mid_rest"]
        index = 1 if kind == "attentions" else 2 * layer
        slot = None  # middle_block is one sequence (resnet, transformer, resnet): no inner slot
    else:
        kind, layer, rest, block = match["kind"], int(match["layer"]), match["rest"], int(match["block"])
        down = match["where"] == "down_blocks"
        if kind in ("downsamplers", "upsamplers"):
            if rest != "conv" or layer != 0:
                return None
            index = 1 + block * (_SGM_LAYERS + 1) + _SGM_LAYERS if down else block * (_SGM_LAYERS + 1) + _SGM_LAYERS
            return f"{'input' if down else 'output'}_blocks_{index}_{'0_op' if down else '2_conv'}"
        if layer > _SGM_LAYERS - down:  # more layers than SDXL's blocks have: not an SDXL base UNet
            return None
        index = 1 + block * (_SGM_LAYERS + 1) + layer if down else block * (_SGM_LAYERS + 1) + layer
        slot = "1" if kind == "attentions" else "0"
    if kind == "resnets":
        if rest not in _SGM_RESNET:
            return None
        rest = _SGM_RESNET[rest]
    where = "middle_block" if match["mid_kind"] else ("input_blocks" if match["where"] == "down_blocks"
                                                       else "output_blocks")
    return f"{where}_{index}_{rest}" if slot is None else f"{where}_{index}_{slot}_{rest}"


def _to_sgm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Kohya keys in SGM numbering, or None when any module has no SGM name (a loader drops mixed files' SGM keys)."""
    renamed = {}
    for key, value in state.items():
        module, _, suffix = key.partition(".")
        sgm = _sgm_module(module.removeprefix("lora_unet_"))
        if sgm is None:
            return None
        renamed[f"lora_unet_{sgm}.{suffix}"] = value
    return renamed


def _kohya_meta(bundle: Bundle, name: str, sgm: bool = False) -> dict[str, str]:
    """sd-scripts' `ss_*` keys and ModelSpec 1.0.1's required `modelspec.*` keys (all strings)."""
    meta, lora = _shareable(bundle.meta), bundle.lora
    v_pred = meta.get("prediction_type") == "v_prediction"
    if meta.get("family") == "sdxl":
        arch, base = "stable-diffusion-xl-v1-base", "sdxl_base_v1-0"
    elif bundle.e_opt.embeds.shape[-1] == 1024:  # SD 2.x text width
        arch, base = ("stable-diffusion-v2-768-v" if v_pred else "stable-diffusion-v2-512"), "sd_v2"
    else:
        arch, base = "stable-diffusion-v1", "sd_v1"
    return {
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": f"{arch}/lora",
        # the key paths: SGM's UNet for SDXL as sd-scripts writes it, otherwise diffusers module paths
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if sgm else "diffusers",
        "modelspec.title": name, "modelspec.resolution": f"{meta.get('width')}x{meta.get('height')}",
        "modelspec.prediction_type": "v" if v_pred else "epsilon", "modelspec.date": meta.get("created", ""),
        "modelspec.description": f"Imagic edit LoRA for the prompt {meta.get('prompt', '')!r}; use it with the "
                                 "exported embeddings (`imagic-lite export --to diffusers`) to reproduce the edit",
        "ss_network_module": "networks.lora", "ss_network_dim": str(lora["r"]),
        "ss_network_alpha": str(lora["lora_alpha"]), "ss_base_model_version": base,
        "ss_v2": str(base == "sd_v2"), "ss_v_parameterization": str(v_pred), "ss_output_name": name,
        "ss_sd_model_name": meta.get("base_model", ""),
        "ss_resolution": f"({meta.get('width')}, {meta.get('height')})",
        "ss_training_comment": f"imagic-lite; targets {', '.join(lora['target_modules'])}",
    }
