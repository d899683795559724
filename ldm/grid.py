"""Image grids (validation samples, txt2img --grid)."""

from __future__ import annotations

from PIL import Image


def image_grid(images: list[Image.Image], columns: int, pad: int = 2) -> Image.Image:
    """Tile equally sized images row-major into a grid with ``pad`` pixels of white between."""
    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new(
        "RGB", (columns * w + (columns - 1) * pad, rows * h + (rows - 1) * pad), "white"
    )
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid.paste(im.convert("RGB"), (c * (w + pad), r * (h + pad)))
    return grid
