"""An `Explanation` as pictures: one PNG per answer token, a grid PNG of the answer, and a self-contained HTML page
(images and numbers inline, no network) where hovering a token shows its heatmap and clicking locks it."""

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


def colour(values: np.ndarray) -> np.ndarray:
    """`(h, w)` in [0, 1] -> `(h, w, 3)` uint8 on the colour scale."""
    position = np.clip(values, 0, 1) * (len(SCALE) - 1)
    low = np.floor(position).astype(int).clip(0, len(SCALE) - 2)
    t = (position - low)[..., None]
    return (SCALE[low] * (1 - t) + SCALE[low + 1] * t).astype(np.uint8)


def shown(image: Image.Image) -> Image.Image:
    scale = VIEW / max(image.size)
    return image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)


def overlay(image: Image.Image, heat: np.ndarray, region, top: float) -> Image.Image:
    """`image` (shown size) with `heat` `(h, w)` laid over `region` of the original, scaled so `top` is full colour."""
    base = shown(image)
    scale = base.width / image.width
    left, upper, right, lower = (round(v * scale) for v in region)
    if top <= 0 or right <= left or lower <= upper:
        return base
    values = Image.fromarray((np.clip(heat / top, 0, 1) * 255).astype(np.uint8))
    values = np.asarray(values.resize((right - left, lower - upper), Image.BILINEAR), dtype=np.float32) / 255
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    tint = np.dstack([colour(values), (values * 200).astype(np.uint8)])
    layer.paste(Image.fromarray(tint, "RGBA"), (left, upper))
    return Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")


def token_picture(explanation, token: int, maps, tops) -> Image.Image:
    """The images side by side with `token`'s heatmaps, the token as the title."""
    panels = [overlay(image, maps[i][token].numpy(), explanation.regions[i], tops[i])
              for i, image in enumerate(explanation.images)]
    title = 22
    width = sum(p.width for p in panels) + 8 * (len(panels) - 1)
    picture = Image.new("RGB", (width, max(p.height for p in panels) + title), "white")
    x = 0
    for panel in panels:
        picture.paste(panel, (x, title))
        x += panel.width + 8
    ImageDraw.Draw(picture).text((4, 4), f"{token}: {explanation.tokens[token]!r}", fill="black")
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


def page_data(explanation) -> dict:
    """What the page's script draws from: the images, their regions, and the maps by token, layer, head, image."""
    numbers = sum(m.numel() for m in explanation.layer_maps)
    per_head = numbers <= PAGE_NUMBERS_LIMIT
    maps = []
    for raw in explanation.layer_maps:  # (T, L, H, h, w)
        kept = raw if per_head else raw.mean(2, keepdim=True)
        maps.append({"shape": list(kept.shape), "values": [float(f"{v:.4g}") for v in kept.flatten().tolist()]})
    return {
        "family": explanation.family, "prompt": explanation.prompt, "tokens": explanation.tokens,
        "layers": explanation.layers, "heads": int(explanation.layer_maps[0].shape[2]), "perHead": per_head,
        "gates": explanation.gates, "normalise": not explanation.gates,
        "images": [{"src": _png(shown(image)), "scale": shown(image).width / image.width,
                    "region": list(region), "width": shown(image).width, "height": shown(image).height}
                   for image, region in zip(explanation.images, explanation.regions)],
        "maps": maps,
    }


def page(explanation) -> str:
    template = resources.files("vlm_fusion.explain").joinpath("page.html").read_text(encoding="utf-8")
    data = json.dumps(page_data(explanation)).replace("</", "<\\/")
    return template.replace("/*DATA*/null", data)


def write(explanation, out: str, progress=None) -> dict:
    """Writes `token_NNN.png` per answer token, `answer.png` (all of them) and `explain.html` into `out`."""
    os.makedirs(out, exist_ok=True)
    maps = explanation.maps()
    tops = [float(m.max()) for m in maps]  # one colour scale per image across the answer
    written = {"tokens": []}
    pictures = []
    indices = range(len(explanation.tokens))
    for token in progress(indices, desc="explain: pictures") if progress else indices:
        picture = token_picture(explanation, token, maps, tops)
        path = os.path.join(out, f"token_{token:03d}.png")
        picture.save(path)
        pictures.append(picture)
        written["tokens"].append(path)
    written["grid"] = os.path.join(out, "answer.png")
    grid_picture(pictures).save(written["grid"])
    written["page"] = os.path.join(out, "explain.html")
    with open(written["page"], "w", encoding="utf-8") as f:
        f.write(page(explanation))
    return written
