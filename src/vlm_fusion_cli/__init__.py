"""The `vlm-fusion` command: one module per command, `vlm_fusion_cli.<command>`, with its `add_arguments(parser)` and
its `run`, imported only when the command line names it (`vlm-fusion --help` imports none).

    demo.py      the shipped demo checkpoints answer questions about a fresh synthetic image
    generate.py  answer a prompt about an image or a clip (and the prompt and loading explain shares)
    explain.py   per-token heatmaps over the images
    serve.py     transformers' OpenAI-compatible server, our families known
    convert.py   upstream checkpoints, through `vlm_fusion.conversion`
    tokens.py    the visual-token budget, by arithmetic
    train.py     one stage of the recipe, here or through `accelerate launch`; the bitsandbytes decision
    evaluate.py  LAVIS's retrieval evaluation of a stage-1 Q-Former
    common.py    the error line, argparse types, the check of a named model before anything heavy

Outside the `vlm_fusion` package on purpose: importing anything inside it imports the package, which registers the
model families with transformers and so imports its modeling code (about 3 s), and `vlm-fusion --help`, `tokens` and
bad arguments answer at once. For the same reason every import of torch, transformers or vlm_fusion here is inside
the function that needs it (marked `# lazy: import time`), never at the top of a module. The arrows go one way:
this package imports vlm_fusion; nothing in vlm_fusion imports it.
"""

import argparse
import importlib
import sys

from .common import fail, missing_model, model_arguments

COMMANDS = {  # each command and its line in --help, in that order
    "demo": "ask the embedded demo checkpoints about a fresh synthetic image",
    "generate": "answer a prompt about an image or a clip with any vlm-fusion model",
    "explain": "what in the images each generated token depends on: per-token maps (PNGs, a page)",
    "serve": "an OpenAI-compatible server for any vlm-fusion model: transformers serve, our families known",
    "convert": "convert an upstream checkpoint (the rest goes to the converter)",
    "tokens": "the visual-token budget of each family",
    "train": "train a model on your data: one stage of LLaVA's recipe (align, instruct), BLIP-2's stage 1 (qformer) "
             "or Flamingo's",
    "evaluate": "evaluate a model on your data: retrieval (a stage-1 Q-Former)",
}


def command_module(name: str):
    return importlib.import_module(f"{__name__}.{name}")  # lazy: import time (each command's parser and its run)


def build_parser(named: str | None) -> argparse.ArgumentParser:
    """Every command with its line for --help; the arguments of the `named` one only (the others are not imported)."""
    parser = argparse.ArgumentParser(prog="vlm-fusion",
                                     description="vlm-fusion: demo, generate, explain, serve, train, evaluate, "
                                                 "convert, tokens.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, line in COMMANDS.items():
        p = commands.add_parser(name, help=line)
        if name == named:
            command_module(name).add_arguments(p)
    return parser


def main(argv=None) -> int:
    own_process = argv is None  # the command line's own process (the console script), not a caller's
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"] and len(argv) > 1:  # everything after a known source is the converter's, --help too
        convert = command_module("convert")
        if argv[1] in convert.CONVERTERS:
            return convert.run(argv[1], argv[2:])
    named = next((word for word in argv if not word.startswith("-")), None)  # as argparse finds the command:
    parser = build_parser(named)  # the first positional (no option of vlm-fusion's own takes a value)
    args, rest = parser.parse_known_args(argv)
    if args.command != "convert" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    command = command_module(args.command)
    if args.command == "tokens" and (reason := command.usage_error(args)):
        parser.error(reason)
    for flag, name in model_arguments(args):  # a folder that is not there, said at once (not after torch, nor the Hub)
        reason = missing_model(name, flag)
        if reason:
            return fail(reason)
    if args.command == "convert":
        return command.run(args.source, rest)
    if args.command == "train":
        return command.run(args, argv, own_process)
    return command.run(args)
