"""Images in and out: load whatever a phone produced as upright 8-bit sRGB, size it for a model, save results.

Every way a user's file can be wrong ends in an `InputError` with a one-line message; every silent change is a note.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageChops, ImageCms, ImageDraw, ImageFont, PngImagePlugin, features

from .errors import InputError
from .files import atomic_path

# Decoders we trust with untrusted bytes; EPS (Ghostscript), PDF, FITS and friends stay out of reach.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_ALLOWED_TEXT = "PNG, JPEG, WebP, GIF, BMP or TIFF"
PARAMS_KEY = "imagic-lite"

# Formats people send that we refuse, by their magic bytes at offset 0 or 4, so the error can say what the file is.
_OTHER_FORMATS = {
    b"ftypheic": "HEIC",
    b"ftypheix": "HEIC",
    b"ftypmif1": "HEIF",
    b"ftypavif": "AVIF",
    b"%PDF": "PDF",
    b"%!PS": "PostScript/EPS",
    b"8BPS": "Photoshop PSD",
    b"\xff\x0a": "JPEG XL",
    b"<svg": "SVG",
    b"<?xml": "SVG",
}
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_HIGH_BIT_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # upright 8-bit RGB, as the user sees it
    notes: tuple[str, ...]  # every change the user might not expect, in plain words
    source_size: tuple[int, int]  # upright (width, height) of the file, before any downscaling


def load_image(
    path: str | os.PathLike,
    *,
    min_side: int = 32,
    max_pixels: int = 40_000_000,
    max_side: int = 4096,
    background: tuple[int, int, int] = (255, 255, 255),
) -> LoadedImage:
    """Decode `path` fully (no half-decoded grey images) and normalise it; see the module docstring."""
    path = Path(path)
    notes: list[str] = []
    _check_file(path)
    try:
        fh = open(path, "rb")  # noqa: SIM115 - kept open while Pillow decodes lazily below
    except OSError as exc:
        raise _open_error(path, exc) from None
    with fh, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own max_pixels check governs
        im = _identify(path, fh)
        width, height = im.size
        if width * height > max_pixels:
            raise InputError(
                f"{path} declares {width}x{height} pixels ({width * height / 1e6:.0f} MP), above the "
                f"{max_pixels / 1e6:g} MP limit; downscale it first"
            )
        if min(width, height) < min_side:
            raise InputError(f"{path} is {width}x{height} pixels; each side must be at least {min_side} pixels")
        frames = getattr(im, "n_frames", 1)
        if frames > 1:
            notes.append(_frames_note(im.format or "", frames))
        if im.format in ("JPEG", "MPO") and max(width, height) > 2 * max_side:
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: a 40 MP photo never has to exist at full size.
            scale = max_side / max(width, height)
            im.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
        try:
            im.load()
        except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, EOFError, ... on bad bytes
            raise InputError(f"{path} is truncated or corrupt ({exc}); re-export or re-copy the image") from exc
        fmt = im.format  # transposed copies forget it
        im, swapped = _upright(im, notes)
        source_size = (height, width) if swapped else (width, height)
        im = _to_rgb(path, im, fmt, background, notes)
        if max(source_size) > max_side:
            scale = max_side / max(source_size)
            target = (max(1, round(source_size[0] * scale)), max(1, round(source_size[1] * scale)))
            im = im.resize(target, Image.Resampling.LANCZOS) if im.size != target else im
            notes.append(f"downscaled from {source_size[0]}x{source_size[1]} to {target[0]}x{target[1]}")
    # The library never prints: Pillow's complaints about the file become notes.
    for w in caught:
        text = str(w.message).strip()
        if "EXIF" in text and not any(note.startswith("EXIF") for note in notes):
            notes.append(f"EXIF metadata is malformed ({text}); check that the image is the right way up")
        elif isinstance(w.message, UserWarning) and "EXIF" not in text:
            notes.append(f"decoder warning: {text}")
    return LoadedImage(image=im, notes=tuple(dict.fromkeys(notes)), source_size=source_size)


def _check_file(path: Path) -> None:
    """Say what is wrong with the path itself, before any decoder sees it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found; check the path") from None
    except OSError as exc:
        raise _open_error(path, exc) from None
    if path.is_dir():
        raise InputError(f"{path} is a folder; pass the path of one image file")
    if not path.is_file():
        raise InputError(f"{path} is not a regular file; pass the path of one image file")
    if st.st_size == 0:
        raise InputError(f"{path} is empty (0 bytes); re-export or re-copy the image")


def _open_error(path: Path, exc: OSError) -> InputError:
    if isinstance(exc, PermissionError):
        return InputError(f"{path}: permission denied; make the file readable (e.g. chmod u+r) or copy it")
    return InputError(f"{path}: cannot read the file ({exc.strerror or exc})")


def _identify(path: Path, fh: BinaryIO) -> Image.Image:
    """Open with the format allowlist; name the format of a refused file when we can recognise it."""
    try:
        return Image.open(fh, formats=list(ALLOWED_FORMATS))
    except Image.DecompressionBombError:
        raise InputError(
            f"{path} declares an image too large to decode safely (a decompression bomb?); downscale it first"
        ) from None
    except Exception as exc:  # UnidentifiedImageError, or a plugin choking on a broken header
        fh.seek(0)
        head = fh.read(32)
        for magic, name in _OTHER_FORMATS.items():
            if head.startswith(magic) or head[4:].startswith(magic):
                raise InputError(
                    f"{path} is a {name} file, which imagic-lite does not read; convert it to {_ALLOWED_TEXT}"
                ) from None
        if isinstance(exc, Image.UnidentifiedImageError):
            raise InputError(f"{path} is not an image imagic-lite can read; use {_ALLOWED_TEXT}") from None
        raise InputError(f"{path} is truncated or corrupt ({exc}); re-export or re-copy the image") from exc


def _frames_note(fmt: str, frames: int) -> str:
    if fmt == "TIFF":
        return f"multi-page TIFF ({frames} pages): using the first page"
    if fmt == "MPO":
        return f"multi-picture JPEG ({frames} pictures): using the main picture"
    return f"animated {'WebP' if fmt == 'WEBP' else fmt} ({frames} frames): using the first frame"


def _upright(im: Image.Image, notes: list[str]) -> tuple[Image.Image, bool]:
    """Apply the EXIF orientation. We transpose ourselves instead of `ImageOps.exif_transpose`: its crashes on
    malformed EXIF (Pillow #4238, #8548, #8605) are in re-serialising EXIF we would discard anyway."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            orientation, malformed = im.getexif().get(0x0112, 1), False
        except Exception:  # ZeroDivisionError, struct.error, ... from a broken IFD
            orientation, malformed = 1, True
    if malformed or caught:
        notes.append("EXIF metadata is malformed; orientation ignored, image used as stored")
        return im, False
    if orientation in (None, 0, 1):
        return im, False
    method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    if method is None:
        notes.append(f"EXIF orientation {orientation!r} is invalid; image used as stored")
        return im, False
    return im.transpose(method), orientation >= 5


def _to_rgb(
    path: Path, im: Image.Image, fmt: str | None, background: tuple[int, int, int], notes: list[str]
) -> Image.Image:
    """Any mode to 8-bit sRGB without the silent losses of a bare `convert("RGB")`."""
    icc = im.info.get("icc_profile")
    if im.mode in _HIGH_BIT_DEPTH:
        im = _to_8bit_gray(im, notes)
    if im.mode == "CMYK" and fmt in ("JPEG", "MPO") and "adobe" not in im.info:
        # Pillow assumes Photoshop's inverted inks for every CMYK JPEG; without the Adobe APP14 marker the JPEG
        # standard (and libvips) say the inks are stored plainly, so undo Pillow's inversion.
        im = ImageChops.invert(im)
        notes.append("CMYK JPEG without an Adobe marker: inks read as not inverted")
    has_alpha = im.mode in _ALPHA_MODES or (im.mode in ("P", "L", "RGB") and "transparency" in im.info)
    try:
        if has_alpha:
            im = im.convert("RGBA")
        elif im.mode not in ("RGB", "L", "CMYK"):
            im = im.convert("RGB")
    except ValueError as exc:
        raise InputError(f"{path} uses colour mode {im.mode}, which cannot be converted to RGB ({exc})") from None
    if icc:
        im = _icc_to_srgb(im, icc, notes)
    if im.mode == "CMYK":
        notes.append("CMYK converted to RGB without a colour profile; colours are approximate")
    elif im.mode == "RGBA" and im.getchannel("A").getextrema()[0] < 255:
        flat = Image.new("RGB", im.size, background)
        flat.paste(im, mask=im.getchannel("A"))
        notes.append(f"transparent areas composited on {_colour_name(background)}")
        return flat
    return im.convert("RGB")


def _to_8bit_gray(im: Image.Image, notes: list[str]) -> Image.Image:
    """16/32-bit grayscale to 8 bits by scaling; `convert("RGB")` clips everything above 255 to white."""
    values = np.asarray(im).astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    if im.mode == "F" and top <= 1.0:
        values = values * 255.0  # float images in [0, 1]
    elif im.mode.startswith("I;16") or top > 255:
        values = values / 257.0  # 0..65535 -> 0..255
    notes.append(f"{'16' if im.mode.startswith('I;16') else '32'}-bit grayscale scaled to 8 bits")
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _icc_to_srgb(im: Image.Image, icc: bytes, notes: list[str]) -> Image.Image:
    """Convert through the embedded profile (iPhone photos are Display P3); unchanged when it cannot be used."""
    space = {"RGB": "RGB", "RGBA": "RGB", "L": "GRAY", "CMYK": "CMYK"}.get(im.mode)
    if space is None or not features.check("littlecms2"):
        return im
    try:
        source = ImageCms.ImageCmsProfile(BytesIO(icc))
        name = (ImageCms.getProfileDescription(source) or "unnamed").strip()
        if source.profile.xcolor_space.strip() != space:
            notes.append(f"colour profile '{name}' does not match the {im.mode} pixels; ignored")
            return im
        out_mode = "RGBA" if im.mode == "RGBA" else "RGB"
        out = ImageCms.profileToProfile(im, source, ImageCms.createProfile("sRGB"), outputMode=out_mode)
    except Exception as exc:  # PyCMSError, OSError, ValueError from a malformed profile
        notes.append(f"embedded colour profile could not be used ({exc}); colours used as stored")
        return im
    if im.mode == "CMYK":
        notes.append(f"CMYK converted to RGB with its colour profile '{name}'")
    elif "srgb" not in name.lower():
        notes.append(f"colour profile '{name}' converted to sRGB")
    return out


def _colour_name(rgb: tuple[int, int, int]) -> str:
    names = {(255, 255, 255): "white", (0, 0, 0): "black"}
    return f"{names[tuple(rgb)]} {tuple(rgb)}" if tuple(rgb) in names else f"RGB {tuple(rgb)}"


def fit_size(width: int, height: int, native: int, multiple: int) -> tuple[int, int]:
    """Size with about `native`**2 pixels (never more), the photo's aspect ratio, sides multiples of `multiple`.

    Models are trained at one area; resizing to it (up or down) rather than square-cropping keeps the whole photo.
    """
    if min(width, height, native, multiple) < 1:
        raise ValueError(f"fit_size needs positive sizes, got {width}x{height}, native {native}, multiple {multiple}")
    budget, aspect = native * native, width / height
    scale = math.sqrt(budget / (width * height))
    best: tuple[float, int, int, int] | None = None
    for w in {math.floor(width * scale / multiple), math.ceil(width * scale / multiple)}:
        for h in {math.floor(height * scale / multiple), math.ceil(height * scale / multiple)}:
            w_px, h_px = max(1, w) * multiple, max(1, h) * multiple
            if w_px * h_px <= budget:
                candidate = (abs(math.log(w_px / h_px / aspect)), -w_px * h_px, w_px, h_px)
                best = candidate if best is None else min(best, candidate)
    if best is not None:
        return best[2], best[3]
    # Extreme aspect ratio (or native < multiple): short side pinned at `multiple`, long side takes what is left.
    long_side = max(multiple, budget // multiple // multiple * multiple)
    return (long_side, multiple) if width >= height else (multiple, long_side)


def fit_crop(width: int, height: int, native: int, multiple: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The working size (`fit_size`) and the centred box of the photo with that size's aspect ratio.

    Sides must be multiples of `multiple` (32 px on the shipped 64 px model, 64 on SD 1.5 at 512), so the working
    size rarely has the photo's exact aspect: cropping the few pixels of difference keeps shapes round, where a
    plain resize would squash them (a 640x480 photo on the shapes model: 64x64, a circle became an ellipse)."""
    w, h = fit_size(width, height, native, multiple)
    if w * height > h * width:  # the working size is wider than the photo: cut rows
        rows = round(width * h / w)
        top = (height - rows) // 2
        return (w, h), (0, top, width, top + rows)
    cols = round(height * w / h)
    left = (width - cols) // 2
    return (w, h), (left, 0, left + cols, height)


def prepare(image: Image.Image, native: int, multiple: int) -> Image.Image:
    """Centre-crop to the working size's aspect ratio (`fit_crop`), then resize (LANCZOS) to it."""
    size, box = fit_crop(*image.size, native, multiple)
    return image.convert("RGB").resize(size, Image.Resampling.LANCZOS, box=box)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> 1x3xHxW float32 in [-1, 1], the range Stable Diffusion's VAE expects."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def from_tensor(x: torch.Tensor) -> list[Image.Image]:
    """Bx3xHxW in [-1, 1] -> PIL images; NaN/Inf raise instead of becoming a black or noisy picture."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"from_tensor expects Bx3xHxW, got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError("from_tensor got NaN or Inf values; the decoder or sampler diverged")
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p, mode="RGB") for p in pixels]


def save_png(path: str | os.PathLike, image: Image.Image, params: dict[str, str | int | float]) -> None:
    """Write atomically, with each param as a tEXt chunk (visible in any viewer) and all of them as one JSON chunk."""
    info = PngImagePlugin.PngInfo()
    for key, value in params.items():
        if not isinstance(value, str | int | float) or not 0 < len(key) < 80 or key == PARAMS_KEY:
            raise ValueError(f"save_png: param {key!r}={value!r} cannot be stored as a PNG text chunk")
        info.add_text(key, str(value))
    info.add_text(PARAMS_KEY, json.dumps(params, sort_keys=True, allow_nan=False))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_png_params(path: str | os.PathLike) -> dict:
    """The params `save_png` wrote; {} for a PNG written by something else."""
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path, formats=["PNG"]) as im:
            text = im.text.get(PARAMS_KEY)  # type: ignore[attr-defined]
    except Exception as exc:
        raise InputError(f"{path} is not a readable PNG ({exc})") from None
    if text is None:
        return {}
    try:
        params = json.loads(text)
    except json.JSONDecodeError:
        raise InputError(f"{path}: the '{PARAMS_KEY}' text chunk is not valid JSON") from None
    if not isinstance(params, dict):
        raise InputError(f"{path}: the '{PARAMS_KEY}' text chunk is not a JSON object")
    return params


def make_grid(
    images: list[list[Image.Image]], row_labels: list[str], col_labels: list[str], title: str | None = None
) -> Image.Image:
    """Labelled contact sheet (rows = seeds, columns = etas in the engine's use); tiny tiles are enlarged with
    NEAREST so a 64 px test image still has room for a readable label."""
    if not images or len(images) != len(row_labels) or any(len(row) != len(col_labels) for row in images):
        raise ValueError(f"make_grid: {len(row_labels)} row and {len(col_labels)} column labels for a different grid")
    if not col_labels:
        raise ValueError("make_grid: the grid has no columns")
    tile_w = max(im.width for row in images for im in row)
    tile_h = max(im.height for row in images for im in row)
    zoom = max(1, math.ceil(128 / min(tile_w, tile_h)))
    size = max(12, min(32, tile_w * zoom // 10))
    font = ImageFont.load_default(size=size) if features.check("freetype2") else ImageFont.load_default()
    pad = size // 2
    cell_w, cell_h = tile_w * zoom + pad, tile_h * zoom + pad  # tiles separated by a white gutter
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max(probe.textbbox((0, 0), label, font=font)[2] for label in row_labels) + 2 * pad
    line = probe.textbbox((0, 0), "Ag", font=font)[3] + 2 * pad
    top = line * (2 if title else 1)
    width = max(left + cell_w * len(col_labels), probe.textbbox((0, 0), title or "", font=font)[2] + 2 * pad)
    grid = Image.new("RGB", (width, top + cell_h * len(row_labels)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for c, label in enumerate(col_labels):
        draw.text((left + c * cell_w + cell_w // 2, top - line // 2), label, fill="black", font=font, anchor="mm")
    for r, (label, row) in enumerate(zip(row_labels, images, strict=True)):
        draw.text((pad, top + r * cell_h + cell_h // 2), label, fill="black", font=font, anchor="lm")
        for c, im in enumerate(row):
            tile = im.convert("RGB").resize((im.width * zoom, im.height * zoom), Image.Resampling.NEAREST)
            x, y = left + c * cell_w + (cell_w - tile.width) // 2, top + r * cell_h + (cell_h - tile.height) // 2
            grid.paste(tile, (x, y))
    return grid
