"""The `vlm-fusion` command's entry point: argument parsing (and the token arithmetic of `tokens`) only, so that `vlm-fusion --help` and bad arguments
answer at once. The commands live in `vlm_fusion.cli`, imported (with torch and transformers) only to run one.

Outside the `vlm_fusion` package on purpose: importing anything inside it imports the package, which registers the
model families with transformers and so imports its modeling code (about 3 s).
"""

import argparse
import os
import re
import sys

DEMO_FAMILIES = ("llava", "blip2", "flamingo")  # as `vlm_fusion.demo.FAMILIES`
DEMO_PREFIX = "demo:"  # `--model demo:llava` names a demo checkpoint shipped in the package
CONVERTERS = {"llava": "convert_llava", "blip2": "convert_blip2", "openflamingo": "convert_openflamingo",
              "idefics": "convert_idefics", "llava-video": "convert_llava_video",
              "instructblip-video": "convert_instructblip_video"}


def positive_int(text: str) -> int:
    """argparse type: a whole number above 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# ---- --model -------------------------------------------------------------------------------------------------------
HUB_ID = re.compile(r"^(?:[\w.-]{1,96}/)?[\w.-]{1,96}$")  # huggingface_hub's validate_repo_id: [namespace/]name
OFFLINE = ("1", "on", "yes", "true")  # huggingface_hub's reading of HF_HUB_OFFLINE


def could_be_hub_id(name: str) -> bool:
    """Whether `name` is shaped as a Hub repo id (no path of a folder: no ./, ../, /, ~, \\, no -- nor ..)."""
    return bool(HUB_ID.match(name)) and "--" not in name and ".." not in name and not name.startswith(("-", ".")) \
        and not name.endswith(("-", ".")) and not name.endswith(".git")


def in_hub_cache(name: str) -> bool:
    """Whether the Hub cache holds a config.json of model `name`, by huggingface_hub's cache layout
    (`HF_HUB_CACHE`, else `HF_HOME/hub`, else ~/.cache/huggingface/hub; `models--owner--name/snapshots/*/`) without
    importing huggingface_hub (0.7 s)."""
    import glob

    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    cache = os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
                               or os.path.join(home, "hub"))
    folder = os.path.join(cache, "models--" + name.replace("/", "--"), "snapshots")
    return bool(glob.glob(os.path.join(glob.escape(folder), "*", "config.json")))


def missing_model(name: str, flag: str = "--model") -> str | None:
    """Why `name` cannot be the model `flag` names, in one line, before anything heavy is imported, or None: a folder,
    a shipped demo model, or a Hub id that may be there. A name that is no folder is said to be none first; only a name
    shaped as a Hub id then goes to the Hub, and with HF_HUB_OFFLINE set only when the Hub cache holds it (the Hub's
    client would otherwise end, after its retries, blaming the network)."""
    if name.startswith(DEMO_PREFIX) or os.path.isdir(name):
        return None
    if os.path.exists(name):
        return f"{flag} {name} is a file, not a model folder (a folder with config.json and the weights)"
    where = f"no model folder {name}" + ("" if os.path.isabs(name) else f" (nothing at {os.path.abspath(name)})")
    if not could_be_hub_id(name):
        return f"{flag}: {where}, and {name!r} is not a Hub id either"
    cached = in_hub_cache(name)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in OFFLINE:
        return None if cached else \
            f"{flag}: {where}, and the Hub id {name} is not in the Hub cache (HF_HUB_OFFLINE is set)"
    from huggingface_hub import constants, model_info  # about 0.7 s: only when the Hub is to be asked
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:  # one request, no retries: transformers' download would retry a missing network for a minute
        model_info(name, timeout=10)
    except GatedRepoError:
        pass  # there, behind its terms: transformers' message says what to do
    except RepositoryNotFoundError:
        return f"{flag}: {where}, and no model {name} on the Hub (or a private one: `hf auth login`)"
    except HfHubHTTPError:
        pass  # the Hub answered: transformers' own message will say the rest
    except Exception as error:  # the network
        if not cached:
            return f"{flag}: {where}, and the Hub is out of reach ({str(error).strip() or type(error).__name__})"
        print(f"vlm-fusion: {flag}: {where}, and the Hub is out of reach: the Hub cache's {name}", file=sys.stderr)
        os.environ["HF_HUB_OFFLINE"] = "1"  # read by transformers when imported, after this
        constants.HF_HUB_OFFLINE = True
        return None
    print(f"vlm-fusion: {flag}: {where}; the Hub's {name}", file=sys.stderr)
    return None


def model_arguments(args) -> list[tuple[str, str]]:
    """`(flag, name)` of every model a command's arguments name: --model (serve's MODEL), and train's parts."""
    flags = {"model": "--model", "vision_tower": "--vision-tower", "language_model": "--language-model",
             "qformer_init": "--qformer-init"}
    named = [(flag, getattr(args, key)) for key, flag in flags.items() if getattr(args, key, None)]
    return [("MODEL", name) if args.command == "serve" else (flag, name) for flag, name in named]


# ---- tokens --------------------------------------------------------------------------------------------------------
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


def height_width(text: str) -> tuple[int, int]:
    """argparse type: `HEIGHTxWIDTH` in pixels."""
    try:
        height, width = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, e.g. 480x640, got {text!r}")
    if height <= 0 or width <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be at least 1 px, got {text!r}")
    return height, width


def tokens(args) -> int:
    try:
        table = visual_tokens(args.image_size, args.patch_size, args.tiles, args.thumbnail, args.num_query_tokens,
                              args.num_latents)
    except ValueError as error:
        print(f"vlm-fusion: error: {error}", file=sys.stderr)
        return 2
    if args.anyres:  # LLaVA-NeXT: the count of the image's own size, as the model packs it
        bad = [grid for grid in args.anyres if grid[0] % args.image_size or grid[1] % args.image_size]
        if bad:
            print(f"vlm-fusion: error: --anyres grids must be multiples of --image-size ({args.image_size}), got {bad}",
                  file=sys.stderr)
            return 2
        from vlm_fusion.anyres import num_tokens  # imports torch and transformers

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


# ---- train ---------------------------------------------------------------------------------------------------------
ACCELERATE_CONFIGS = ("ddp", "fsdp2", "zero2", "zero3")  # shipped in vlm_fusion/training/accelerate/


def key_value(text: str) -> tuple[str, object]:
    """argparse type: `KEY=VALUE`, the value read as JSON when it parses (numbers, true/false, lists), else a string."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def add_train_parser(commands) -> None:
    p = commands.add_parser(
        "train", help="train a model on your data: one stage of LLaVA's recipe (align, instruct), BLIP-2's stage 1 "
                      "(qformer) or Flamingo's",
        description="One stage of the recipe on transformers' Trainer: from a vlm-fusion checkpoint (--model) or from "
                    "pretrained parts (--family, --vision-tower, --language-model), to a vlm-fusion checkpoint with "
                    "its processor and a model card recording the training.")
    data = p.add_argument_group("data")
    data.add_argument("--data", required=True, help="LLaVA JSON / JSON lines, or a local TRL-format dataset "
                      "(`messages` + `images`: a save_to_disk folder, .json/.jsonl or .parquet)")
    data.add_argument("--image-folder", help="the folder LLaVA-format image paths are relative to")
    data.add_argument("--max-length", type=positive_int, default=2048, help="longest sample in tokens, images included")
    data.add_argument("--skip-too-long", action="store_true",
                      help="skip longer samples (with a count) instead of refusing the data; none is ever cut")
    data.add_argument("--streaming", action="store_true",
                      help="align / qformer: stream image-caption pairs from a local `datasets` dataset (an image and a "
                      "caption column; save_to_disk folder or .parquet) instead of reading it whole; WebDataset shards "
                      "(--data 'shards/{00000..00999}.tar' or a folder of .tar files) are always streamed; give "
                      "--max-steps unless the number of samples is known")
    data.add_argument("--layout", choices=("plain", "chat"), help="default: the stage's (align: plain, else chat)")
    data.add_argument("--chat-template", help="a Jinja chat template file for the chat layout (default: the "
                      "processor's); saved with the output's processor")
    data.add_argument("--eval-data", help="held-out samples in the formats of --data: their loss is logged every "
                      "--eval-steps (eval_loss) and drawn in the loss curve")
    data.add_argument("--eval-steps", type=positive_int, help="steps between two evaluations (default: --save-steps)")
    data.add_argument("--data-cache", help="where the data pass caches the encoded samples, for every process, "
                      "--resume and reruns (default: $VLM_FUSION_DATA_CACHE, else ~/.cache/vlm_fusion/data)")
    data.add_argument("--clear-data-cache", action="store_true", help="remove the data cache's folders this run "
                      "does not use (other data, older processors or versions); the log says how big the cache is")
    data.add_argument("--data-workers", type=int, help="processes of the data pass (default: one per core, at most "
                      "16; 0: in the training process)")
    data.add_argument("--plain-end", help='what ends a plain-layout sample (default "\\n"; Flamingo: <|endofchunk|>)')
    model = p.add_argument_group("model")
    model.add_argument("--stage", choices=("align", "instruct", "flamingo", "qformer"), default="instruct",
                       help="qformer: BLIP-2's stage 1 (ITC + ITM + ITG) on image-caption pairs, no LM")
    model.add_argument("--model", help="a vlm-fusion checkpoint to start from (e.g. the align stage's output; for "
                       "--stage align with --language-model, a stage-1 Q-Former checkpoint: BLIP-2's stage 2)")
    model.add_argument("--family", choices=DEMO_FAMILIES, help="compose a new model of this family from parts")
    model.add_argument("--vision-tower", help="with --family: a vision checkpoint (CLIP, SigLIP, DINOv2, ViT, ...)")
    model.add_argument("--language-model", help="with --family: a causal LM checkpoint with its tokenizer")
    model.add_argument("--qformer-init", help="--stage qformer: a BERT checkpoint the Q-Former starts from "
                       "(BLIP-2: bert-base-uncased); its tokenizer becomes the Q-Former's")
    model.add_argument("--qformer-tokenizer", help="--stage qformer from scratch (no --qformer-init): the Q-Former's "
                       "tokenizer")
    model.add_argument("--bridge", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="with --family: a bridge config field, e.g. projector_type=mlp2x_gelu, num_query_tokens=32")
    model.add_argument("--lora", action="store_true", help="instruct: LoRA adapters on the LM instead of training it")
    model.add_argument("--qlora", action="store_true", help="instruct: the LM in 4-bit with LoRA adapters")
    model.add_argument("--lora-r", type=positive_int, default=128)
    model.add_argument("--lora-alpha", type=positive_int, default=256)
    model.add_argument("--train-tower", action="store_true", help="train the vision tower too (at --tower-lr)")
    optimisation = p.add_argument_group("optimisation")
    optimisation.add_argument("--bridge-lr", type=float, help="default: the stage's (align 1e-3, instruct 2e-5)")
    optimisation.add_argument("--lm-lr", type=float, help="default: the stage's (instruct 2e-5; LoRA 2e-4)")
    optimisation.add_argument("--tower-lr", type=float, default=2e-6)
    optimisation.add_argument("--batch-size", type=positive_int, default=8, help="per process")
    optimisation.add_argument("--gradient-accumulation", type=positive_int, default=1)
    optimisation.add_argument("--epochs", type=float, default=1.0)
    optimisation.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    optimisation.add_argument("--warmup", type=float, help="a fraction of the steps (< 1) or steps (default 0.03)")
    optimisation.add_argument("--weight-decay", type=float)
    optimisation.add_argument("--bf16", action="store_true")
    optimisation.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant")
    optimisation.add_argument("--group-by-length", action="store_true", help="batch samples of similar length")
    optimisation.add_argument("--seed", type=int, default=0)
    run = p.add_argument_group("run")
    run.add_argument("--output-dir", required=True)
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    run.add_argument("--overwrite", action="store_true", help="empty a used --output-dir and start again")
    run.add_argument("--logging-steps", type=positive_int, help="default: every step of a short run, up to every 10")
    run.add_argument("--save-steps", type=positive_int, default=500)
    run.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    run.add_argument("--report-to", choices=("tensorboard", "wandb", "none"), default="none",
                     help="also send the logs to TensorBoard (event files in OUTPUT_DIR/runs) or Weights & Biases")
    run.add_argument("--accelerate", metavar="CONFIG", help=f"run through `accelerate launch` with a shipped config "
                     f"({', '.join(ACCELERATE_CONFIGS)}) or a config file of yours")
    run.add_argument("--num-processes", type=positive_int, help="with --accelerate: processes (default: the config's)")


def launch_training(args, argv: list[str]) -> int:
    """`accelerate launch --config_file CONFIG [--num_processes N] -m vlm_fusion.training <the other flags>`."""
    import subprocess

    config = args.accelerate
    if config in ACCELERATE_CONFIGS:
        config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vlm_fusion", "training", "accelerate",
                              f"{config}.yaml")
    if not os.path.isfile(config):
        print(f"vlm-fusion: error: --accelerate takes {', '.join(ACCELERATE_CONFIGS)} or a config file; no file "
              f"{config}", file=sys.stderr)
        return 2
    rest, skip = [], False
    for i, item in enumerate(argv[1:], start=1):  # drop --accelerate / --num-processes (and their values)
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in ("--accelerate", "--num-processes"):
            skip = "=" not in item
            continue
        rest.append(item)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
    if args.num_processes:
        command += ["--num_processes", str(args.num_processes)]
    return subprocess.call([*command, "-m", "vlm_fusion.training", *rest])


# ---- evaluate -------------------------------------------------------------------------------------------------------
def add_evaluate_parser(commands) -> None:
    p = commands.add_parser("evaluate", help="evaluate a model on your data: retrieval (a stage-1 Q-Former)")
    evaluations = p.add_subparsers(dest="evaluation", required=True)
    p = evaluations.add_parser(
        "retrieval", help="image-text retrieval R@1/5/10 of a stage-1 Q-Former checkpoint, by LAVIS's procedure",
        description="LAVIS's BLIP-2 retrieval evaluation: ITC similarity for every image-caption pair, ITM re-ranking "
                    "of each image's top k captions and each caption's top k images, then R@1/5/10 both ways, printed "
                    "and written as JSON under LAVIS's key names (txt_r1 ... r_mean, agg_metrics).")
    p.add_argument("--model", required=True, help="a stage-1 Q-Former checkpoint (model_type fusion_blip2_qformer)")
    p.add_argument("--data", required=True, help="image-caption samples, in any format `vlm-fusion train` reads; the "
                   "caption is the assistant turn; an image in several samples is one image with several captions")
    p.add_argument("--image-folder", help="the folder LLaVA-format image paths are relative to")
    p.add_argument("--k", type=positive_int, default=128, help="candidates ITM re-ranks per image and per caption, "
                   "the best by ITC (LAVIS's k_test; capped at the number of candidates)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images, captions or image-caption pairs per "
                   "forward pass")
    p.add_argument("--output", metavar="FILE.json", help="where to write the metrics (default: "
                   "<model>/retrieval_results.json)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlm-fusion",
                                     description="vlm-fusion: demo, generate, explain, serve, train, evaluate, "
                                                 "convert, tokens.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="ask the embedded demo checkpoints about a fresh synthetic image")
    p.add_argument("--family", choices=DEMO_FAMILIES + ("all",), default="all")
    p.add_argument("--seed", type=int, default=None, help="the image's seed (default: a fresh one)")
    p.add_argument("--save-image", metavar="PNG", help="also save the image (upscaled 4x)")
    p = commands.add_parser("generate", help="answer a prompt about an image or a clip with any vlm-fusion model")
    p.add_argument("--model", required=True,
                   help="directory, Hub id, or a shipped demo model: " + ", ".join(DEMO_PREFIX + f for f in DEMO_FAMILIES))
    p.add_argument("--image", help="an image file")
    p.add_argument("--video", help="a video file (read with PyAV), for a model whose processor reads clips")
    p.add_argument("--num-frames", type=positive_int, default=None,
                   help="frames sampled from --video, uniformly (default: the video processor's)")
    p.add_argument("--prompt", required=True, help="the question; it is put in the model's chat template")
    p.add_argument("--raw", action="store_true",
                   help="use --prompt as it is, no chat template (<image> marks the image; default: before the text)")
    p.add_argument("--max-new-tokens", type=positive_int, default=30)
    p = commands.add_parser("explain", help="where the model looked: per-token heatmaps over the images (PNGs, a page)")
    p.add_argument("--model", required=True,
                   help="directory, Hub id, or a shipped demo model: " + ", ".join(DEMO_PREFIX + f for f in DEMO_FAMILIES))
    p.add_argument("--image", required=True, action="append", help="an image; repeat for several, in prompt order")
    p.add_argument("--prompt", required=True, help="the question; it is put in the model's chat template")
    p.add_argument("--raw", action="store_true",
                   help="use --prompt as it is, no chat template (one <image> per image; default: before the text)")
    p.add_argument("--out", required=True, help="directory for token_NNN.png, answer.png and explain.html")
    p.add_argument("--max-new-tokens", type=positive_int, default=30)
    p = commands.add_parser(
        "serve", help="an OpenAI-compatible server for any vlm-fusion model: transformers serve, our families known",
        description="transformers' own server (`transformers serve`) with the vlm-fusion families known to it: the "
                    "OpenAI chat API at http://HOST:PORT/v1 (images as URLs or base64 data URLs), answers from the "
                    "model's generate. Every option after MODEL is transformers serve's (`vlm-fusion serve MODEL "
                    "--help` lists them), except --continuous-batching, which transformers runs for text-only models "
                    "only. Needs transformers' serving extras: pip install \"transformers[serving]\".")
    p.add_argument("model", help="directory, Hub id, or a shipped demo model: "
                   + ", ".join(DEMO_PREFIX + f for f in DEMO_FAMILIES))
    p.add_argument("options", nargs=argparse.REMAINDER, help="transformers serve's options, e.g. --host, --port, "
                   "--dtype, --device, --trust-remote-code")
    p = commands.add_parser("convert", help="convert an upstream checkpoint (the rest goes to the converter)")
    p.add_argument("source", choices=sorted(CONVERTERS))
    p = commands.add_parser("tokens", help="the visual-token budget of each family")
    p.add_argument("--image-size", type=positive_int, default=336)
    p.add_argument("--patch-size", type=positive_int, default=14)
    p.add_argument("--tiles", type=positive_int, default=1)
    p.add_argument("--thumbnail", action="store_true", help="add a downscaled whole-image crop to the tiles")
    p.add_argument("--family", choices=DEMO_FAMILIES + ("all",), default="all")
    p.add_argument("--num-query-tokens", type=positive_int, default=32, help="BLIP-2-style queries per crop")
    p.add_argument("--num-latents", type=positive_int, default=64, help="Flamingo-style latents per crop")
    p.add_argument("--context", type=positive_int, default=4096, help="the LM's context window")
    p.add_argument("--anyres", type=lambda text: [height_width(g) for g in text.split(",")], metavar="HxW,HxW,...",
                   help="LLaVA-NeXT grids (image_grid_pinpoints), e.g. 336x672,672x336,672x672,1008x336,336x1008")
    p.add_argument("--image", type=height_width, default=None, metavar="HxW",
                   help="with --anyres: the image's own size, which sets its LLaVA-style token count")
    add_train_parser(commands)
    add_evaluate_parser(commands)
    whole_process = argv is None  # the command line's own process (the console script), not a caller's
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"] and argv[1:2] and argv[1] in CONVERTERS:  # everything after the source is the converter's,
        from vlm_fusion import cli  # --help included

        return cli.convert(argparse.Namespace(source=argv[1]), argv[2:])
    args, rest = parser.parse_known_args(argv)
    if args.command != "convert" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "tokens" and bool(args.anyres) != bool(args.image):
        parser.error("--anyres and --image go together")
    if args.command == "demo" and args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    if args.command == "tokens":  # arithmetic: no model, no torch
        return tokens(args)
    for flag, name in model_arguments(args):  # a folder that is not there, said at once (not after torch, nor the Hub)
        reason = missing_model(name, flag)
        if reason:
            print(f"vlm-fusion: error: {reason}", file=sys.stderr)
            return 2
    from vlm_fusion import cli  # the commands, with torch and transformers: only now that the arguments are right

    if args.command == "train" and args.accelerate:  # relaunch through accelerate's launcher, N processes
        return launch_training(args, argv)
    if args.command == "train" and whole_process and not cli.needs_bitsandbytes(args):
        # This process is the command's, not a caller's that may quantise later. peft, which transformers' Trainer
        # imports, imports bitsandbytes eagerly, and bitsandbytes compiles its CPU kernels with torch.compile when
        # imported: about a second of every launch and rerun. Nothing here quantises, so it goes without: peft and
        # transformers then see bitsandbytes as not installed.
        sys.modules.setdefault("bitsandbytes", None)
    if args.command == "evaluate":
        return {"retrieval": cli.evaluate_retrieval}[args.evaluation](args)
    commands_run = {"demo": cli.demo, "generate": cli.generate, "explain": cli.explain, "serve": cli.serve,
                    "train": cli.train}
    return commands_run[args.command](args) \
        if args.command != "convert" else cli.convert(args, rest)


if __name__ == "__main__":
    sys.exit(main())
