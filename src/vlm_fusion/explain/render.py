"""Explanations as pictures: one PNG per answer token (a row per method), a grid PNG of the answer, and a
self-contained HTML page (images and numbers inline, no network) where hovering a token shows its maps and clicking
locks it.

Colours: each method has one scale for the whole answer, 0 to the largest value of any shown token's map on any
image (`scale_top`); the PNGs draw with it and print it on their legend, and the page uses the same numbers (per-token
scaling is a switch there). Values at or below 0 (occlusion: removing the cell did not lower the token) are left
clear. Special tokens (`</s>`) are left out of the pictures and the page's answer strip unless asked for. A map is
drawn on its patch grid, each cell one flat colour, clipped to the image: nothing glows past its edge.
"""

import base64
import io
import json
import os
from importlib import resources

import numpy as np
from PIL import Image, ImageDraw

VIEW = 256  # pixels on the longer side of each image shown
PAGE_NUMBERS_LIMIT = 4_000_000  # per-layer-and-head maps beyond this go in the page as per-layer means only
# an "inferno"-like colour scale: black, purple, red, orange, pale yellow
SCALE = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)
LEGEND = 14  # the legend bar's height in the PNGs
DESCRIPTIONS = {
    "relevance": "relevance: gradient-weighted attention through LM, bridge and tower (Chefer et al. 2021)",
    "occlusion": "occlusion: fall in the token's log-odds when the cell is replaced",
    "attention": "attention: where the token's attention went (not attribution)",
}


def colour(values: np.ndarray) -> np.ndarray:
    """`(h, w)` in [0, 1] -> `(h, w, 3)` uint8 on the colour scale."""
    position = np.clip(values, 0, 1) * (len(SCALE) - 1)
    low = np.floor(position).astype(int).clip(0, len(SCALE) - 2)
    t = (position - low)[..., None]
    return (SCALE[low] * (1 - t) + SCALE[low + 1] * t).astype(np.uint8)


def shown(image: Image.Image) -> Image.Image:
    scale = VIEW / max(image.size)
    return image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)


def shown_tokens(explanation, special: bool = False) -> list[int]:
    """The answer tokens drawn: all, or (by default) all but the special ones."""
    return [t for t in range(len(explanation.tokens))
            if special or not (explanation.special and explanation.special[t])]


def scale_top(explanation, tokens) -> float:
    """The method's one colour scale for the answer: the largest value of the `tokens`' maps over all images."""
    return max([float(m[tokens].max()) for m in explanation.maps()] + [0.0]) if tokens else 0.0


def overlay(image: Image.Image, heat: np.ndarray, region, top: float) -> Image.Image:
    """`image` (shown size) with `heat` `(h, w)` over `region` of the original, each cell flat, `top` full colour,
    clipped to the image."""
    base = shown(image)
    scale = base.width / image.width
    left, upper, right, lower = (round(v * scale) for v in region)
    if top <= 0 or right <= left or lower <= upper:
        return base
    values = np.clip(heat / top, 0, 1).astype(np.float32)
    h, w = values.shape
    rows = np.minimum((np.arange(lower - upper) * h) // (lower - upper), h - 1)  # each pixel's cell
    cols = np.minimum((np.arange(right - left) * w) // (right - left), w - 1)
    cells = values[rows][:, cols]
    tint = np.dstack([colour(cells), (cells * 200).astype(np.uint8)])
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    layer.paste(Image.fromarray(tint, "RGBA"), (left, upper))  # paste clips to the image
    return Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")


def legend(width: int, top: float, label: str) -> Image.Image:
    """A colour bar from 0 to `top` with its numbers, and `label`."""
    picture = Image.new("RGB", (width, LEGEND + 14), "white")
    bar = colour(np.tile(np.linspace(0, 1, width - 80)[None], (LEGEND, 1)))
    picture.paste(Image.fromarray(bar), (40, 0))
    draw = ImageDraw.Draw(picture)
    draw.text((2, 2), "0", fill="black")
    draw.text((width - 38, 2), f"{top:.3g}", fill="black")
    draw.text((2, LEGEND + 1), label[: width // 6], fill="black")
    return picture


def token_picture(explanations, token: int, tops) -> Image.Image:
    """A row per method: the images with `token`'s map, then its legend; the token as the title."""
    rows = []
    for explanation, top in zip(explanations, tops):
        maps = explanation.maps()
        panels = [overlay(image, maps[i][token].numpy(), explanation.regions[i], top)
                  for i, image in enumerate(explanation.images)]
        width = sum(p.width for p in panels) + 8 * (len(panels) - 1)
        row = Image.new("RGB", (width, max(p.height for p in panels)), "white")
        x = 0
        for panel in panels:
            row.paste(panel, (x, 0))
            x += panel.width + 8
        rows.append((row, legend(width, top, explanation.method)))
    title = 22
    width = max(row.width for row, _ in rows)
    picture = Image.new("RGB", (width, title + sum(r.height + k.height + 6 for r, k in rows)), "white")
    y = title
    for row, key in rows:
        picture.paste(row, (0, y))
        picture.paste(key, (0, y + row.height + 2))
        y += row.height + key.height + 6
    ImageDraw.Draw(picture).text((4, 4), f"{token}: {explanations[0].tokens[token]!r}", fill="black")
    return picture


def grid_picture(pictures: list[Image.Image], columns: int = 6) -> Image.Image:
    columns = min(columns, len(pictures))
    rows = -(-len(pictures) // columns)
    w, h = max(p.width for p in pictures), max(p.height for p in pictures)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for index, picture in enumerate(pictures):
        grid.paste(picture, ((index % columns) * w, (index // columns) * h))
    return grid


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def method_data(explanation) -> dict:
    """One method's numbers for the page: maps by token, layer, head, image, and its answer-wide scale."""
    numbers = sum(m.numel() for m in explanation.layer_maps)
    per_head = numbers <= PAGE_NUMBERS_LIMIT
    maps = []
    for raw in explanation.layer_maps:  # (T, L, H, h, w)
        kept = raw if per_head else raw.mean(2, keepdim=True)
        maps.append({"shape": list(kept.shape), "values": [float(f"{v:.4g}") for v in kept.flatten().tolist()]})
    return {
        "method": explanation.method, "description": DESCRIPTIONS[explanation.method],
        "layers": explanation.layers, "heads": int(explanation.layer_maps[0].shape[2]), "perHead": per_head,
        "gates": explanation.gates, "normalise": explanation.method == "attention" and not explanation.gates,
        "top": scale_top(explanation, shown_tokens(explanation)), "maps": maps,
        "secondsPerToken": explanation.seconds / len(explanation.tokens),
    }


def page_data(explanations) -> dict:
    """What the page's script draws from: the answer, the question, the images and each method's maps."""
    first = explanations[0]
    return {
        "family": first.family, "prompt": first.prompt, "question": first.question, "tokens": first.tokens,
        "special": first.special or [False] * len(first.tokens),
        "images": [{"src": _png(shown(image)), "scale": shown(image).width / image.width,
                    "region": list(region), "width": shown(image).width, "height": shown(image).height}
                   for image, region in zip(first.images, first.regions)],
        "methods": [method_data(e) for e in explanations],
    }


def page(explanations) -> str:
    explanations = explanations if isinstance(explanations, (list, tuple)) else [explanations]
    template = resources.files("vlm_fusion.explain").joinpath("page.html").read_text(encoding="utf-8")
    data = json.dumps(page_data(explanations)).replace("</", "<\\/")
    return template.replace("/*DATA*/null", data)


def write(explanations, out: str, progress=None, special: bool = False) -> dict:
    """Writes `token_NNN.png` per shown answer token (a row per method), `answer.png` (all of them) and
    `explain.html` into `out`. `explanations`: one `Explanation`, or several of the same answer (one per method)."""
    explanations = explanations if isinstance(explanations, (list, tuple)) else [explanations]
    os.makedirs(out, exist_ok=True)
    tokens = shown_tokens(explanations[0], special)
    tops = [scale_top(e, tokens) for e in explanations]
    written = {"tokens": [], "tops": dict(zip([e.method for e in explanations], tops))}
    pictures = []
    for token in progress(tokens, desc="explain: pictures") if progress else tokens:
        picture = token_picture(explanations, token, tops)
        path = os.path.join(out, f"token_{token:03d}.png")
        picture.save(path)
        pictures.append(picture)
        written["tokens"].append(path)
    written["grid"] = os.path.join(out, "answer.png")
    if pictures:
        grid_picture(pictures).save(written["grid"])
    written["page"] = os.path.join(out, "explain.html")
    with open(written["page"], "w", encoding="utf-8") as f:
        f.write(page(explanations))
    return written
