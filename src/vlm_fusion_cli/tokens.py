"""`vlm-fusion tokens`: the visual-token budget of each family, by arithmetic (no model, no torch; `--anyres` asks
`vlm_fusion.anyres`)."""

import argparse

from .common import FAMILY_NAMES, fail, positive_int


def height_width(text: str) -> tuple[int, int]:
    """argparse type: `HEIGHTxWIDTH` in pixels."""
    try:
        height, width = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, e.g. 480x640, got {text!r}")
    if height <= 0 or width <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be at least 1 px, got {text!r}")
    return height, width


def add_arguments(p) -> None:
    p.add_argument("--image-size", type=positive_int, default=336)
    p.add_argument("--patch-size", type=positive_int, default=14)
    p.add_argument("--tiles", type=positive_int, default=1)
    p.add_argument("--thumbnail", action="store_true", help="add a downscaled whole-image crop to the tiles")
    p.add_argument("--family", choices=FAMILY_NAMES + ("all",), default="all")
    p.add_argument("--num-query-tokens", type=positive_int, default=32, help="BLIP-2-style queries per crop")
    p.add_argument("--num-latents", type=positive_int, default=64, help="Flamingo-style latents per crop")
    p.add_argument("--context", type=positive_int, default=4096, help="the LM's context window")
    p.add_argument("--anyres", type=lambda text: [height_width(g) for g in text.split(",")], metavar="HxW,HxW,...",
                   help="LLaVA-NeXT grids (image_grid_pinpoints), e.g. 336x672,672x336,672x672,1008x336,336x1008")
    p.add_argument("--image", type=height_width, default=None, metavar="HxW",
                   help="with --anyres: the image's own size, which sets its LLaVA-style token count")


def usage_error(args) -> str | None:
    """What the parser cannot check flag by flag, said as its own errors are."""
    return "--anyres and --image go together" if bool(args.anyres) != bool(args.image) else None


def visual_tokens(image_size: int, patch_size: int, tiles: int = 1, thumbnail: bool = False,
                  num_query_tokens: int = 32, num_latents: int = 64) -> dict:
    """LM positions per image for each family, and what they cost (the seeds' token-budget formulas)."""
    if image_size < patch_size:
        raise ValueError(f"--image-size ({image_size}) is smaller than --patch-size ({patch_size})")
    crops = tiles + (1 if thumbnail else 0)
    per_crop = (image_size // patch_size) ** 2
    return {
        "llava": {"lm_tokens": crops * per_crop, "note": f"{crops} crop(s) x {per_crop} patches"},
        "blip2": {"lm_tokens": crops * num_query_tokens, "note": f"{crops} crop(s) x {num_query_tokens} queries"},
        "flamingo": {"lm_tokens": 1, "note": f"1 <image> token; {crops * num_latents} latents reached by cross-attention"},
    }


def run(args) -> int:
    try:
        table = visual_tokens(args.image_size, args.patch_size, args.tiles, args.thumbnail, args.num_query_tokens,
                              args.num_latents)
    except ValueError as error:
        return fail(str(error))
    if args.anyres:  # LLaVA-NeXT: the count of the image's own size, as the model packs it
        bad = [grid for grid in args.anyres if grid[0] % args.image_size or grid[1] % args.image_size]
        if bad:
            return fail(f"--anyres grids must be multiples of --image-size ({args.image_size}), got {bad}")
        from vlm_fusion.anyres import num_tokens  # lazy: imports torch and transformers (import time)

        count = num_tokens(args.image, pinpoints=[list(g) for g in args.anyres], tile=args.image_size,
                           patch=args.patch_size)
        table["llava"] = {"lm_tokens": count, "note": f"anyres: a {args.image[0]}x{args.image[1]} image, base tile + "
                                                      "unpadded grid + one newline per row"}
    families = table if args.family == "all" else {args.family: table[args.family]}
    print(f"{args.image_size}px, {args.patch_size}px patches, {args.tiles} tile(s)"
          f"{' + thumbnail' if args.thumbnail else ''}; context window {args.context} tokens")
    for family, row in families.items():
        share = row["lm_tokens"] / args.context
        print(f"  {family:<9} {row['lm_tokens']:>6} LM tokens per image  ({share:.1%} of the context)  {row['note']}")
    return 0
