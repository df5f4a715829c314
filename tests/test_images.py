"""Tests for imagic_lite.images: every way a phone photo can be odd, built in tmp_path (no binary fixtures)."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageCms, ImageFile

from imagic_lite import images
from imagic_lite.errors import InputError
from imagic_lite.images import (
    fit_size,
    from_tensor,
    load_image,
    make_grid,
    prepare,
    read_png_params,
    save_png,
    to_tensor,
)

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 40), (20, 40, 210)


def _photo(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A picture whose left half is red and right half blue, so rotations and colour errors are visible."""
    im = Image.new("RGB", size, BLUE)
    im.paste(RED, (0, 0, size[0] // 2, size[1]))
    return im


def _save(tmp_path: Path, name: str, im: Image.Image, **kwargs) -> Path:
    path = tmp_path / name
    im.save(path, **kwargs)
    return path


def _close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A few hundred bytes that declare a huge image: the decompression-bomb shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def _strip_jpeg_segment(data: bytes, marker: int) -> bytes:
    """Remove every APPn segment `marker` (e.g. 0xEE, Adobe APP14) from a JPEG's header."""
    out, i = bytearray(data[:2]), 2
    while data[i] == 0xFF and data[i + 1] != 0xDA:  # up to start-of-scan
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if data[i + 1] != marker:
            out += data[i : i + 2 + length]
        i += 2 + length
    return bytes(out + data[i:])


# ---- errors the user can cause -------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "nope.jpg")


def test_directory(tmp_path):
    with pytest.raises(InputError, match="is a folder"):
        load_image(tmp_path)


def test_permission_denied_simulated(tmp_path, monkeypatch):
    path = _save(tmp_path, "a.png", _photo())

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images, "open", denied, raising=False)  # shadows the builtin inside images.py only
    with pytest.raises(InputError, match="permission denied"):
        load_image(path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file")
def test_permission_denied_real(tmp_path):
    path = _save(tmp_path, "a.png", _photo())
    path.chmod(0)
    try:
        with pytest.raises(InputError, match="permission denied"):
            load_image(path)
    finally:
        path.chmod(0o600)


def test_zero_bytes(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_image(path)


def test_text_renamed_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("shopping list\n" * 20)
    with pytest.raises(InputError, match="not an image.*PNG, JPEG, WebP, GIF, BMP or TIFF"):
        load_image(path)


@pytest.mark.parametrize(
    ("head", "name"), [(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "HEIC"), (b"%PDF-1.7\n", "PDF")]
)
def test_known_other_format_is_named(tmp_path, head, name):
    path = tmp_path / "photo.jpg"
    path.write_bytes(head + b"\x00" * 200)
    with pytest.raises(InputError, match=f"is a {name} file.*PNG, JPEG"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["EPS", "ICO", "PPM"])
def test_real_images_in_other_formats_are_refused(tmp_path, fmt):
    path = _save(tmp_path, f"x.{fmt.lower()}", _photo(), format=fmt)
    with pytest.raises(InputError, match="PNG, JPEG, WebP, GIF, BMP or TIFF"):
        load_image(path)


@pytest.mark.parametrize(("fmt", "keep"), [("JPEG", 0.6), ("PNG", 0.6), ("JPEG", 0.1)])
def test_truncated_files_fail_instead_of_decoding_grey(tmp_path, fmt, keep):
    noise = Image.merge("RGB", [Image.effect_noise((256, 256), 60)] * 3)
    data = (_save(tmp_path, "full", noise, format=fmt)).read_bytes()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("size", [(100_000, 100_000), (8000, 6000)])  # past Pillow's own limit / past ours only
def test_decompression_bomb(tmp_path, size):
    before = Image.MAX_IMAGE_PIXELS
    path = _png_header_only(tmp_path / "bomb.png", *size)
    assert path.stat().st_size < 200
    with pytest.raises(InputError, match="downscale it first"):
        load_image(path)
    assert before == Image.MAX_IMAGE_PIXELS


def test_max_pixels_is_checked_before_decoding(tmp_path):
    path = _png_header_only(tmp_path / "x.png", 2000, 2000)  # would fail to decode: no pixel data at all
    with pytest.raises(InputError, match="2000x2000 pixels .* above the 1 MP limit"):
        load_image(path, max_pixels=1_000_000)


def test_tiny_image(tmp_path):
    path = _save(tmp_path, "tiny.png", _photo((20, 10)))
    with pytest.raises(InputError, match=r"20x10 pixels; each side must be at least 32"):
        load_image(path)


# ---- odd but valid images ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ext", "label"), [("gif", "animated GIF"), ("webp", "animated WebP"), ("png", "animated PNG")]
)
def test_animated_uses_first_frame(tmp_path, ext, label):
    frames = [Image.new("RGB", (64, 64), c) for c in (RED, GREEN, BLUE)]
    path = _save(tmp_path, f"anim.{ext}", frames[0], save_all=True, append_images=frames[1:], lossless=True)
    loaded = load_image(path)
    assert _close(loaded.image.getpixel((10, 10)), RED, tol=20)
    assert f"{label} (3 frames): using the first frame" in loaded.notes


def test_mpo_phone_jpeg_uses_main_picture(tmp_path):
    path = _save(
        tmp_path, "phone.jpg", _photo(), format="MPO", save_all=True, append_images=[Image.new("RGB", (96, 64))]
    )
    loaded = load_image(path)
    assert _close(loaded.image.getpixel((10, 10)), RED)
    assert any("multi-picture JPEG" in note for note in loaded.notes)


def test_cmyk_jpeg_adobe(tmp_path):
    original = _photo()
    path = _save(tmp_path, "cmyk.jpg", original.convert("CMYK"), quality=95)
    assert "adobe" in Image.open(path).info  # Pillow writes Photoshop-style inverted inks with the marker
    loaded = load_image(path)
    assert loaded.image.mode == "RGB"
    assert _close(loaded.image.getpixel((10, 10)), original.convert("CMYK").convert("RGB").getpixel((10, 10)))
    assert any("CMYK converted to RGB" in note for note in loaded.notes)


@pytest.mark.parametrize("orientation", [1, 3])
def test_cmyk_jpeg_without_adobe_marker_is_not_inverted(tmp_path, orientation):
    original = _photo().convert("CMYK")
    # Pillow inverts on save; pre-inverting stores plain inks, then dropping APP14 makes a standard CMYK JPEG.
    inverted = Image.merge("CMYK", [Image.eval(band, lambda v: 255 - v) for band in original.split()])
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _save(tmp_path, "adobe.jpg", inverted, quality=95, exif=exif).read_bytes()
    path = tmp_path / "plain.jpg"
    path.write_bytes(_strip_jpeg_segment(data, 0xEE))
    assert "adobe" not in Image.open(path).info
    loaded = load_image(path)
    expected = original.convert("RGB").rotate(0 if orientation == 1 else 180)
    assert _close(loaded.image.getpixel((10, 10)), expected.getpixel((10, 10)))
    assert any("without an Adobe marker" in note for note in loaded.notes)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_keeps_its_levels(tmp_path, fmt):
    ramp = np.linspace(0, 65535, 256 * 64).astype(np.uint16).reshape(64, 256)
    path = _save(tmp_path, f"g16.{fmt.lower()}", Image.fromarray(ramp), format=fmt)
    assert Image.open(path).mode.startswith("I;16")
    assert len(np.unique(np.asarray(Image.open(path).convert("RGB")))) < 100  # what a bare convert does
    loaded = load_image(path)
    pixels = np.asarray(loaded.image)
    assert len(np.unique(pixels)) > 250
    assert pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == 255
    assert (pixels[..., 0] == pixels[..., 2]).all()
    assert "16-bit grayscale scaled to 8 bits" in loaded.notes


def test_palette_without_transparency(tmp_path):
    path = _save(tmp_path, "p.png", _photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=4))
    loaded = load_image(path)
    assert _close(loaded.image.getpixel((10, 10)), RED, tol=2)
    assert loaded.notes == ()


def test_palette_with_transparency(tmp_path):
    im = _photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    blue_index = im.getpixel((90, 10))
    path = _save(tmp_path, "pt.png", im, transparency=blue_index)
    loaded = load_image(path)
    assert loaded.image.getpixel((90, 10)) == (255, 255, 255)
    assert _close(loaded.image.getpixel((10, 10)), RED, tol=2)
    assert "transparent areas composited on white (255, 255, 255)" in loaded.notes


def test_grayscale_l(tmp_path):
    path = _save(tmp_path, "l.png", _photo().convert("L"))
    loaded = load_image(path)
    r, g, b = loaded.image.getpixel((10, 10))
    assert loaded.image.mode == "RGB" and r == g == b and loaded.notes == ()


def test_grayscale_la_and_rgba_composited_on_background(tmp_path):
    la = Image.new("LA", (64, 64), (100, 255))
    la.paste((100, 0), (32, 0, 64, 64))
    loaded = load_image(_save(tmp_path, "la.png", la), background=(0, 0, 0))
    assert loaded.image.getpixel((5, 5)) == (100, 100, 100)
    assert loaded.image.getpixel((40, 5)) == (0, 0, 0)
    assert "transparent areas composited on black (0, 0, 0)" in loaded.notes

    rgba = _photo().convert("RGBA")
    rgba.putalpha(128)
    loaded = load_image(_save(tmp_path, "half.png", rgba), background=(10, 20, 30))
    expected = tuple((c + b) // 2 for c, b in zip(RED, (10, 20, 30), strict=True))
    assert _close(loaded.image.getpixel((10, 10)), expected, tol=2)
    assert "transparent areas composited on RGB (10, 20, 30)" in loaded.notes


def test_opaque_rgba_needs_no_note(tmp_path):
    loaded = load_image(_save(tmp_path, "opaque.png", _photo().convert("RGBA")))
    assert loaded.notes == () and loaded.image.mode == "RGB"


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "WEBP", "GIF"])
def test_other_allowed_formats_load(tmp_path, fmt):
    loaded = load_image(_save(tmp_path, f"x.{fmt.lower()}", _photo(), format=fmt, lossless=True))
    assert loaded.image.size == (96, 64) and _close(loaded.image.getpixel((10, 10)), RED, tol=20)


def test_exif_rotated_jpeg_is_upright(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90° clockwise
    path = _save(tmp_path, "rot.jpg", _photo((96, 64)), exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.image.size == loaded.source_size == (64, 96)
    assert _close(loaded.image.getpixel((32, 10)), RED)  # the stored left half is now on top
    assert _close(loaded.image.getpixel((32, 85)), BLUE)


def test_invalid_exif_orientation_falls_back(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 9
    loaded = load_image(_save(tmp_path, "bad.jpg", _photo(), exif=exif))
    assert loaded.image.size == (96, 64)
    assert any("EXIF orientation 9 is invalid" in note for note in loaded.notes)


def test_malformed_exif_falls_back(tmp_path, monkeypatch):
    # A doubled header as in Pillow #8348 makes Pillow warn "Corrupt EXIF data".
    raw = b"Exif\x00\x00Exif\x00\x00II*\x00\x08\x00\x00\x00\x06\x00\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00"
    loaded = load_image(_save(tmp_path, "dup.jpg", _photo(), exif=raw))
    assert loaded.image.size == (96, 64)
    assert any(note.startswith("EXIF metadata is malformed") for note in loaded.notes)

    def broken(self):
        raise ZeroDivisionError("bad rational")  # the crash class of Pillow #8605

    monkeypatch.setattr(Image.Image, "getexif", broken)
    loaded = load_image(_save(tmp_path, "zero.jpg", _photo()))
    assert loaded.image.size == (96, 64)
    assert "EXIF metadata is malformed; orientation ignored, image used as stored" in loaded.notes


def test_huge_side_is_downscaled(tmp_path):
    loaded = load_image(_save(tmp_path, "wide.png", _photo((5000, 100))))
    assert loaded.image.size == (4096, 82) and loaded.source_size == (5000, 100)
    assert "downscaled from 5000x100 to 4096x82" in loaded.notes


def test_huge_jpeg_uses_reduced_decoding(tmp_path):
    loaded = load_image(_save(tmp_path, "pano.jpg", _photo((9000, 200)), quality=90))
    assert loaded.image.size == (4096, 91) and loaded.source_size == (9000, 200)
    assert _close(loaded.image.getpixel((100, 40)), RED) and _close(loaded.image.getpixel((4000, 40)), BLUE)


def _swapped_primaries_profile() -> bytes:
    """sRGB with the red and green primaries exchanged and renamed: what is red in this space is sRGB green."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", data[128:132])[0]
    entry = {bytes(data[132 + 12 * i : 136 + 12 * i]): 132 + 12 * i for i in range(count)}
    r, g = entry[b"rXYZ"] + 4, entry[b"gXYZ"] + 4
    data[r : r + 8], data[g : g + 8] = data[g : g + 8], data[r : r + 8]
    return bytes(data).replace("sRGB".encode("utf-16-be"), "Swap".encode("utf-16-be"))


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_embedded_colour_profile_is_converted_to_srgb(tmp_path, mode):
    path = _save(tmp_path, "wide.png", Image.new(mode, (64, 64), "red"), icc_profile=_swapped_primaries_profile())
    loaded = load_image(path)
    assert _close(loaded.image.getpixel((5, 5)), (0, 255, 0), tol=3)
    assert "colour profile 'Swap built-in' converted to sRGB" in loaded.notes


def test_srgb_profile_is_applied_quietly_and_a_broken_one_is_survived(tmp_path):
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    loaded = load_image(_save(tmp_path, "srgb.png", _photo(), icc_profile=srgb))
    assert loaded.notes == () and _close(loaded.image.getpixel((10, 10)), RED, tol=3)

    loaded = load_image(_save(tmp_path, "junk.png", _photo(), icc_profile=b"not a profile" * 10))
    assert _close(loaded.image.getpixel((10, 10)), RED, tol=0)
    assert any("colour profile could not be used" in note for note in loaded.notes)


# ---- sizing and tensors --------------------------------------------------------------------------------------


def test_fit_size_examples():
    assert fit_size(512, 512, 512, 64) == (512, 512)
    assert fit_size(2048, 2048, 512, 64) == (512, 512)
    w, h = fit_size(4032, 3024, 512, 64)
    assert w * h <= 512 * 512 and abs(w / h - 4 / 3) < 0.1 and w % 64 == 0 and h % 64 == 0
    assert fit_size(3024, 4032, 512, 64) == (h, w)
    assert fit_size(64, 48, 32, 8) == (32, 24)
    assert fit_size(100, 100, 64, 16) == (64, 64)
    assert fit_size(10_000, 10, 64, 16) == (256, 16)
    assert fit_size(1, 1, 8, 64) == (64, 64)


@given(
    st.integers(1, 20_000),
    st.integers(1, 20_000),
    st.sampled_from([32, 64, 512, 768, 1024]),
    st.sampled_from([8, 16, 64]),
)
def test_fit_size_properties(width, height, native, multiple):
    w, h = fit_size(width, height, native, multiple)
    assert w >= multiple and h >= multiple and w % multiple == 0 and h % multiple == 0
    assert w * h <= max(native * native, multiple * multiple) or min(w, h) == multiple
    if min(width, height) * native >= max(width, height) * 4 * multiple:  # aspect not extreme for this grid
        assert abs(np.log(w / h) - np.log(width / height)) <= np.log(1 + 2 * multiple / min(w, h))


def test_prepare_and_tensor_round_trip():
    im = prepare(_photo((400, 300)), 64, 16)
    assert im.size == fit_size(400, 300, 64, 16)
    x = to_tensor(im)
    assert x.shape == (1, 3, im.height, im.width) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    (back,) = from_tensor(x)
    assert np.array_equal(np.asarray(back), np.asarray(im))


def test_from_tensor_clamps_and_rejects_nan():
    out = from_tensor(torch.tensor([[[[3.0]], [[-3.0]], [[0.0]]]]).repeat(2, 1, 4, 4))
    assert len(out) == 2 and out[0].getpixel((0, 0)) == (255, 0, 128)
    with pytest.raises(ValueError, match="NaN"):
        from_tensor(torch.full((1, 3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="Bx3xHxW"):
        from_tensor(torch.zeros(3, 4, 4))


# ---- outputs -------------------------------------------------------------------------------------------------


def test_save_png_round_trip(tmp_path):
    params = {"prompt": "a dog — jumping", "eta": 0.7, "seed": 3}
    path = tmp_path / "out" / "edit.png"
    save_png(path, _photo(), params)
    assert read_png_params(path) == params
    with Image.open(path) as im:
        assert im.text["eta"] == "0.7" and im.text["prompt"] == "a dog — jumping"
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(_photo()))
    assert read_png_params(_save(tmp_path, "plain.png", _photo())) == {}
    assert [p.name for p in path.parent.iterdir()] == ["edit.png"]


def test_save_png_failure_leaves_no_file(tmp_path, monkeypatch):
    def crash(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_png(tmp_path / "edit.png", _photo(), {"seed": 1})
    assert list(tmp_path.iterdir()) == []


def test_read_png_params_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_png_params(tmp_path / "none.png")
    with pytest.raises(InputError, match="not a readable PNG"):
        read_png_params(_save(tmp_path, "x.jpg", _photo()))


def test_make_grid_layout_and_labels():
    tiles = [[Image.new("RGB", (64, 64), c) for c in (RED, GREEN, BLUE)] for _ in range(2)]
    grid = make_grid(tiles, ["seed 0", "seed 1"], ["eta 0.5", "eta 0.7", "eta 1.0"], title="a dog jumping")
    pixels = np.asarray(grid)
    # 64 px tiles are shown at 128 px: find them by their colours, and the labels outside them.
    tinted = np.zeros(pixels.shape[:2], bool)
    for colour in (RED, GREEN, BLUE):
        tinted |= (pixels == colour).all(axis=-1)
    rows, cols = np.nonzero(tinted)
    top, left = rows.min(), cols.min()
    assert (tinted[:, left + 64]).sum() == 2 * 128 and (tinted[top + 64, :]).sum() == 3 * 128
    assert (pixels[:top, left:] < 100).any()  # column labels and title are drawn above the tiles
    assert (pixels[top:, :left] < 100).any()  # row labels are drawn left of them
    with pytest.raises(ValueError):
        make_grid(tiles, ["one"], ["a", "b", "c"])
