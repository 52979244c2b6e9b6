"""Sample grids as PNG: where a person would rather look than read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor, path: Path, nrow: int = 10, upscale: int = 2, pad: int = 1) -> Path:
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), 64, np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = arr[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid[..., :3])
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    path = Path(path)
    img.save(path)
    return path
