"""Image conversion rules shared by training and predict: bit depth, alpha, palette, CMYK, EXIF, pixel limit."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hiervision.data.imageio import ImageReader, find_images, probe_image, read_image


def _gradient(h: int = 24, w: int = 32) -> np.ndarray:
    """A 16-bit grey ramp using the whole 0..65535 range (the case that used to clip to near-white)."""
    return np.linspace(0, 65535, h * w).reshape(h, w).astype(np.uint16)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    a16 = _gradient()
    Image.fromarray(a16).save(tmp_path / "g16.png")
    Image.fromarray(np.rint(a16 / 257).astype(np.uint8)).save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # really a 16-bit file
    for chans in (1, 3):
        x16, x8 = read_image(tmp_path / "g16.png", chans), read_image(tmp_path / "g8.png", chans)
        assert x16.shape == (chans, 24, 32) and x16.dtype == torch.float32
        assert (x16 - x8).abs().max() <= 1 / 255 + 1e-6
        assert 0.45 < x16.mean() < 0.55  # a clipped reading is ~1.0 almost everywhere
    reader = ImageReader(1)
    assert torch.equal(reader(str(tmp_path / "g16.png")), reader(str(tmp_path / "g8.png")))
    assert probe_image(reader, str(tmp_path / "g16.png")) == (1, (24, 32))


def test_alpha_palette_cmyk_and_grey_modes(tmp_path: Path) -> None:
    # fully transparent red pixels: composited on white, not shown as the hidden red (or black)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    x = read_image(tmp_path / "rgba.png", 3)
    assert x[:, 0, 0].tolist() == [1.0, 0.0, 0.0] and x[:, 3, 0].tolist() == [1.0, 1.0, 1.0]
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    assert read_image(tmp_path / "la.png", 1).min() == 1.0
    # palette with a transparent index, and a plain palette
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png", 3)[:, 0, 0].tolist() == [0.0, 0.0, 1.0]
    p.save(tmp_path / "pt.png", transparency=1)
    assert read_image(tmp_path / "pt.png", 3)[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    red = read_image(tmp_path / "c.jpg", 3)[:, 0, 0]
    assert red[0] > 0.95 and red[1] < 0.05 and red[2] < 0.05
    Image.new("1", (4, 4), 1).save(tmp_path / "bw.png")
    assert read_image(tmp_path / "bw.png", 3).min() == 1.0
    Image.fromarray(np.full((4, 4), 0.5, np.float32), "F").save(tmp_path / "f.tif")
    assert read_image(tmp_path / "f.tif", 1)[0, 0, 0] == pytest.approx(128 / 255)


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = 255  # left half white in the stored pixels
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    im.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    x = read_image(tmp_path / "rot.jpg", 1)
    assert x.shape == (1, 20, 10)  # upright: taller than wide
    assert x[0, :8].mean() > 0.9 and x[0, 12:].mean() < 0.1  # the white half is now on top
    assert probe_image(ImageReader(3), str(tmp_path / "rot.jpg")) == (3, (20, 10))


def _huge_png(path: Path, w: int, h: int) -> None:
    """A valid PNG header claiming ``w``×``h`` pixels with almost no data (what a decompression bomb looks like)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))  # fmt: skip


def test_pixel_limit_and_decompression_bomb_are_one_line(tmp_path: Path) -> None:
    _huge_png(tmp_path / "big.png", 10000, 8000)  # 80 MP: over the default 64 MP, refused before decoding
    with pytest.raises(ValueError, match=r"big\.png: image is 10000x8000 = 80000000 pixels, over the limit") as e:
        read_image(tmp_path / "big.png", 3)
    assert "\n" not in str(e.value)
    _huge_png(tmp_path / "bomb.png", 20000, 20000)  # 400 MP: Pillow's own guard fires at open
    for limit in (None, 10**9):
        with pytest.raises(ValueError, match=r"bomb\.png: image too large, refused as a possible decompression bomb"):
            read_image(tmp_path / "bomb.png", 3, max_pixels=limit)
    Image.new("L", (100, 100)).save(tmp_path / "ok.png")
    assert read_image(tmp_path / "ok.png", 1).shape == (1, 100, 100)
    with pytest.raises(ValueError, match=r"ok\.png: image is 100x100 = 10000 pixels, over the limit data\.max_pixels"):
        read_image(tmp_path / "ok.png", 1, max_pixels=9999)
    with pytest.raises(ValueError, match=r"ok\.png: image is 100x100"):
        probe_image(ImageReader(1, max_pixels=50), str(tmp_path / "ok.png"))


def test_unreadable_files_and_resizing(tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"junk\.png: cannot read image") as e:
        read_image(tmp_path / "junk.png", 3)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"none\.png: cannot read image \(no such file\)"):
        read_image(tmp_path / "none.png", 3)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "r.png")
    assert read_image(tmp_path / "r.png", 3, 8).shape == (3, 8, 8)
    assert read_image(tmp_path / "r.png", 1, (5, 7)).shape == (1, 5, 7)
    with pytest.raises(ValueError, match="in_chans"):
        read_image(tmp_path / "r.png", 2)


def test_find_images_skips_hidden(tmp_path: Path) -> None:
    for rel in ("a/x.png", "a/.y.png", ".git/z.png", "b/c/w.jpg", "b/readme.txt", "__MACOSX/a/q.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == ["a/x.png", "b/c/w.jpg"]
