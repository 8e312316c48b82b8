"""Dynamic-resolution tiling ("anyres", LLaVA-NeXT) for the LLaVA-style family: the arithmetic and the packing.

An image of H x W pixels is resized to the grid resolution `select_best_resolution` picks from `image_grid_pinpoints`
(rows x cols tiles of the tower's size S), padded to it, cut into its tiles, and a downscaled whole-image thumbnail
(the base tile) goes first. Each tile gives p x p patch features (p = S / patch). The grid's features are laid out
as one (rows*p) x (cols*p) map, the rows and columns that are padding are cut away ("unpad"), and a learned
`image_newline` vector ends each row. The LM sees, per image:

    p*p (base tile) + h*w (unpadded grid) + h (one newline per row)

LLaVA-OneVision's "anyres_max_N" (`max_tiles=N`) first resizes a large unpadded grid down (bilinear) to about N
tiles' features, `floor(h / r)` x `floor(w / r)` with `r = sqrt(h * w / (N * p * p))`, when `r > 1.1`.

Legend: N images, T tiles of one image (base first), P = p*p patches per tile, D LM width, h x w unpadded grid.
"""

import math

import torch
from torch import nn
from transformers.image_processing_utils import select_best_resolution


def grid_shape(image_size: tuple[int, int], pinpoints: list, tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of `image_size` (height, width)."""
    height, width = select_best_resolution([int(image_size[0]), int(image_size[1])], pinpoints)
    return height // tile, width // tile


def num_tiles(image_size: tuple[int, int], pinpoints: list, tile: int) -> int:
    """Tiles the tower sees for one image: the grid's, plus the base tile."""
    rows, cols = grid_shape(image_size, pinpoints, tile)
    return rows * cols + 1


def unpadded_shape(image_size: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """The `height` x `width` feature map of a padded grid, less the rows or columns that are padding."""
    original_height, original_width = int(image_size[0]), int(image_size[1])
    if original_width / original_height > width / height:
        new_height = int(round(original_height * (width / original_width), 7))
        return height - 2 * ((height - new_height) // 2), width
    new_width = int(round(original_width * (height / original_height), 7))
    return height, width - 2 * ((width - new_width) // 2)


def downscaled_shape(height: int, width: int, p: int, max_tiles: int | None) -> tuple[int, int]:
    """The `height` x `width` unpadded grid after anyres_max_N's resize (`max_tiles=N`; `None`: unchanged)."""
    if max_tiles is None:
        return height, width
    ratio = math.sqrt(height * width / (max_tiles * p * p))
    if ratio <= 1.1:
        return height, width
    return int(height // ratio), int(width // ratio)


def num_tokens(image_size: tuple[int, int], *, pinpoints: list, tile: int, patch: int,
               max_tiles: int | None = None) -> int:
    """LM positions one image of `image_size` (height, width) takes: base tile + unpadded grid + newlines."""
    p = tile // patch
    rows, cols = grid_shape(image_size, pinpoints, tile)
    h, w = downscaled_shape(*unpadded_shape(image_size, rows * p, cols * p), p, max_tiles)
    return p * p + h * w + h


def pack(features: torch.Tensor, image_size: tuple[int, int], *, pinpoints: list, tile: int, patch: int,
         newline: torch.Tensor, max_tiles: int | None = None) -> torch.Tensor:
    """
    One image's tile features `(T, P, D)` (base tile first) -> its visual tokens `(num_tokens, D)`: the base tile,
    then the unpadded grid (resized down for `max_tiles`) row by row, each row ended by `newline` `(D,)`.
    """
    T, P, D = features.shape
    p = tile // patch
    rows, cols = grid_shape(image_size, pinpoints, tile)
    if T != rows * cols + 1 or P != p * p:
        raise ValueError(f"An image of {tuple(int(s) for s in image_size)} px takes {rows * cols + 1} tiles of {p * p} "
                         f"patches; got {T} tiles of {P} features.")
    grid = features[1:].view(rows, cols, p, p, D)  # (rows, cols, p, p, D)
    grid = grid.permute(0, 2, 1, 3, 4).reshape(rows * p, cols * p, D)  # (rows*p, cols*p, D)
    h, w = unpadded_shape(image_size, rows * p, cols * p)
    top, left = (rows * p - h) // 2, (cols * p - w) // 2
    grid = grid[top : top + h, left : left + w]  # (h, w, D)
    resized = downscaled_shape(h, w, p, max_tiles)
    if resized != (h, w):  # anyres_max_N
        grid = nn.functional.interpolate(grid.permute(2, 0, 1)[None], size=resized, mode="bilinear")  # (1, D, h', w')
        grid = grid[0].permute(1, 2, 0)  # (h', w', D)
        h, w = resized
    ends = newline.to(grid.dtype).expand(h, 1, D)  # (h, 1, D)
    return torch.cat([features[0], torch.cat([grid, ends], dim=1).reshape(h * (w + 1), D)])  # (p*p + h*(w+1), D)
