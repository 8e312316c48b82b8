"""`method="occlusion"`, and the masked forward passes the faithfulness scores are made of.

Occlusion: for each cell of a grid laid over the tower's input (by default its patch grid), that cell of the
image's `pixel_values` is replaced by a baseline (`"mean"`: the image's mean per channel; `"blur"`: the image
blurred), the prompt and answer are run again, and the cell's value for each answer token is how much the token's
log-odds log(p / (1 - p)) fell: the log-probability's order of the cells (both grow with p), read where a confident
model's log-probability is 0 to float32 precision (p = 1 - 1e-9; the demo models answer so) and would rank the
cells by rounding noise. Slow (one forward pass per cell, batched) but causal: the reference the other maps are judged
by. Nothing is generated again: the answer is kept and only its probabilities are read (teacher forcing).

Legend: N images, K variants (masks), T answer tokens, h x w the grid's cells, C x Y x X the pixels.
"""

import torch
import torch.nn.functional as F

from .routes import ExplainError

BASELINES = ("mean", "blur", "background")


def baseline_pixels(pixel_values: torch.Tensor, kind: str) -> torch.Tensor:
    """`(N, C, Y, X)` what a removed cell shows: each image's mean colour, the image blurred (a Gaussian of a
    twelfth of its side), or its `"background"`: its most frequent colour (on a plain background, where the mean colour
    is tinted by the objects)."""
    if kind == "mean":
        return pixel_values.mean((-1, -2), keepdim=True).expand_as(pixel_values)
    if kind == "background":
        fills = []
        for image in pixel_values:  # (C, Y, X)
            colours, counts = image.flatten(1).T.unique(dim=0, return_counts=True)  # (distinct, C), (distinct,)
            fills.append(colours[counts.argmax()])
        return torch.stack(fills)[..., None, None].expand_as(pixel_values)
    if kind != "blur":
        raise ExplainError(f"unknown baseline {kind!r}: one of {', '.join(BASELINES)}")
    sigma = max(pixel_values.shape[-1] / 12, 1.0)
    radius = int(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=pixel_values.device)
    kernel = (-(x**2) / (2 * sigma**2)).exp()
    kernel = kernel / kernel.sum()
    C = pixel_values.shape[1]
    out = pixel_values.float()
    pad = min(radius, pixel_values.shape[-1] - 1, pixel_values.shape[-2] - 1)
    for weights, padding in ((kernel.view(1, 1, 1, -1), (pad, pad, 0, 0)), (kernel.view(1, 1, -1, 1), (0, 0, pad, pad))):
        out = F.pad(out, padding, mode="reflect")
        out = F.conv2d(out, weights.expand(C, 1, *weights.shape[-2:]), groups=C,
                       padding=(0, radius - pad) if padding[0] else (radius - pad, 0))
    return out.to(pixel_values.dtype)


def cell_masks(grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """`(h*w, Y, X)` bool: cell k (row by row) of an `h x w` grid over a `Y x X` image; cell (r, c) spans rows
    `r*Y//h` to `(r+1)*Y//h` and columns `c*X//w` to `(c+1)*X//w`."""
    h, w = grid
    Y, X = size
    masks = torch.zeros(h * w, Y, X, dtype=torch.bool)
    for r in range(h):
        for c in range(w):
            masks[r * w + c, r * Y // h : (r + 1) * Y // h, c * X // w : (c + 1) * X // w] = True
    return masks


def log_odds(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """`(..., T)` log(p / (1 - p)) of each token from `logits` `(..., T, vocab)`: the log-probability's order, without
    its saturation (a token at p = 1 - 1e-9 has a log-probability float32 reads as 0, and a log-odds of 20.7)."""
    logprobs = logits.double().log_softmax(-1)
    chosen = logprobs.gather(-1, token_ids.expand(*logits.shape[:-1])[..., None])[..., 0]
    others = logprobs.scatter(-1, token_ids.expand(*logits.shape[:-1])[..., None], float("-inf")).logsumexp(-1)
    return (chosen - others).float()


def answer_log_odds(model, inputs: dict, rows: torch.Tensor, token_ids, variants: torch.Tensor,
                    batch_size: int = 16) -> torch.Tensor:
    """`(K, T)` the answer tokens' log-odds with the images replaced by each of `variants` `(K, N, C, Y, X)`,
    `batch_size` variants per forward pass."""
    out = []
    ids = torch.as_tensor(token_ids, device=rows.device)
    for start in range(0, len(variants), batch_size):
        chunk = variants[start : start + batch_size]  # (b, N, C, Y, X)
        b = len(chunk)
        batch = {**inputs, "pixel_values": chunk.flatten(0, 1),  # the samples' images in order: (b*N, C, Y, X)
                 "input_ids": inputs["input_ids"].expand(b, -1), "attention_mask": inputs["attention_mask"].expand(b, -1)}
        with torch.no_grad():
            logits = model(**batch).logits[:, rows]  # (b, T, vocab)
        out.append(log_odds(logits, ids))
    return torch.cat(out)


def with_cells_replaced(pixel_values: torch.Tensor, image: int, masks: torch.Tensor, baseline: torch.Tensor):
    """`(K, N, C, Y, X)`: the images with, in variant k, the pixels of `masks[k]` `(Y, X)` of image `image` replaced by
    `baseline` `(N, C, Y, X)`."""
    variants = pixel_values[None].repeat(len(masks), *[1] * pixel_values.dim())
    variants[:, image] = torch.where(masks[:, None], baseline[image], pixel_values[image])
    return variants


def occlusion_maps(model, inputs: dict, rows: torch.Tensor, token_ids: torch.Tensor, *, grid=None,
                   baseline: str = "mean", batch_size: int = 16, progress=None) -> list[torch.Tensor]:
    """Per image `(T, h, w)`: the fall in each answer token's log-odds when the cell is replaced."""
    pixel_values = inputs["pixel_values"]
    if pixel_values.dim() != 4:
        raise ExplainError(f"occlusion takes images as (images, channels, height, width), got pixel_values of shape "
                           f"{tuple(pixel_values.shape)} (anyres tiles): not supported")
    grid = grid or default_grid(model, pixel_values)
    fill = baseline_pixels(pixel_values, baseline)
    masks = cell_masks(grid, pixel_values.shape[-2:]).to(pixel_values.device)
    reference = answer_log_odds(model, inputs, rows, token_ids, pixel_values[None])[0]  # (T,)
    maps = []
    images = range(len(pixel_values))
    for image in progress(images, desc="explain: occlusion") if progress else images:
        scores = answer_log_odds(model, inputs, rows, token_ids,
                                 with_cells_replaced(pixel_values, image, masks, fill), batch_size)  # (h*w, T)
        maps.append((reference - scores).T.reshape(len(rows), *grid).cpu())
    return maps


def default_grid(model, pixel_values: torch.Tensor) -> tuple[int, int]:
    """The tower's patch grid over `pixel_values`: the cells occlusion replaces unless told otherwise."""
    patch = model.config.vision_config.patch_size
    return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
