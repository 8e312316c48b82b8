"""The `vlm-fusion` command: one module per command, each with its `add_parser(commands)` and its `run`.

    demo.py      the shipped demo checkpoints answer questions about a fresh synthetic image
    generate.py  answer a prompt about an image or a clip (and the prompt and loading explain shares)
    explain.py   per-token heatmaps over the images
    serve.py     transformers' OpenAI-compatible server, our families known
    train.py     one stage of the recipe, here or through `accelerate launch`; the bitsandbytes decision
    evaluate.py  LAVIS's retrieval evaluation of a stage-1 Q-Former
    convert.py   upstream checkpoints, through `vlm_fusion.conversion`
    tokens.py    the visual-token budget, by arithmetic
    common.py    the error line, argparse types, the check of a named model before anything heavy

Outside the `vlm_fusion` package on purpose: importing anything inside it imports the package, which registers the
model families with transformers and so imports its modeling code (about 3 s), and `vlm-fusion --help`, `tokens` and
bad arguments answer at once. For the same reason every import of torch, transformers or vlm_fusion here is inside
the function that needs it (marked `# lazy: import time`), never at the top of a module. The arrows go one way:
this package imports vlm_fusion; nothing in vlm_fusion imports it.
"""

import argparse
import sys

from . import convert, demo, evaluate, explain, generate, serve, tokens, train
from .common import fail, missing_model, model_arguments

COMMANDS = {"demo": demo, "generate": generate, "explain": explain, "serve": serve, "convert": convert,
            "tokens": tokens, "train": train, "evaluate": evaluate}  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-fusion",
                                     description="vlm-fusion: demo, generate, explain, serve, train, evaluate, "
                                                 "convert, tokens.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(commands)
    return parser


def main(argv=None) -> int:
    own_process = argv is None  # the command line's own process (the console script), not a caller's
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"] and argv[1:2] and argv[1] in convert.CONVERTERS:  # the rest is the converter's,
        return convert.run(argv[1], argv[2:])  # --help included
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "convert" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "tokens" and (reason := tokens.usage_error(args)):
        parser.error(reason)
    for flag, name in model_arguments(args):  # a folder that is not there, said at once (not after torch, nor the Hub)
        reason = missing_model(name, flag)
        if reason:
            return fail(reason)
    if args.command == "convert":
        return convert.run(args.source, rest)
    if args.command == "train":
        return train.run(args, argv, own_process)
    return COMMANDS[args.command].run(args)
