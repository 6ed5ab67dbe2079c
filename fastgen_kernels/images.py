"""PNG image grids with no imaging library: zlib-compressed 8-bit grayscale or RGB scanlines."""

from __future__ import annotations

import os
import struct
import zlib

import torch
from torch import Tensor


def grid(images: Tensor, rows: int | None = None, pad: int = 1, scale: int = 1) -> Tensor:
    """(N, C, H, W) images in [-1, 1] -> one (C, H', W') uint8 grid, ``rows`` rows (default: about
    square), ``pad`` pixels of black between tiles, each pixel repeated ``scale`` times."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"grid: images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    rows = rows or max(1, round(n ** 0.5))
    cols = -(-n // rows)
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    pixels = pixels.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    h, w = h * scale, w * scale
    out = torch.zeros(c, rows * (h + pad) + pad, cols * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        out[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = pixels[i]
    return out


def write_png(image: Tensor, path: str | os.PathLike) -> None:
    """Writes a (1 or 3, H, W) uint8 tensor as a PNG file."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"write_png: image must be (1 or 3, H, W) uint8, got {tuple(image.shape)} {image.dtype}")
    c, h, w = image.shape
    rows = image.permute(1, 2, 0).reshape(h, w * c).numpy()
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)   # filter type 0 on every scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                + chunk(b"IEND", b""))


def save_grid(images: Tensor, path: str | os.PathLike, **options) -> None:
    """``write_png(grid(images, **options), path)``."""
    write_png(grid(images, **options), path)
