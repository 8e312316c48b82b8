"""`vlm-fusion serve`: transformers' OpenAI-compatible server with the vlm-fusion families known to it."""

import argparse

from .common import MODEL_HELP, fail, resolve_model


def add_arguments(p) -> None:
    p.description = ("transformers' own server (`transformers serve`) with the vlm-fusion families known to it: the "
                     "OpenAI chat API at http://HOST:PORT/v1 (images as URLs or base64 data URLs), answers from the "
                     "model's generate. Every option after MODEL is transformers serve's (`vlm-fusion serve MODEL "
                     "--help` lists them), except --continuous-batching, which transformers runs for text-only models "
                     "only. Needs transformers' serving extras: pip install \"transformers[serving]\".")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("options", nargs=argparse.REMAINDER, help="transformers serve's options, e.g. --host, --port, "
                   "--dtype, --device, --trust-remote-code")


def run(args) -> int:
    """transformers' OpenAI-compatible server on one model (see `vlm_fusion.integrations.transformers_serve`)."""
    from vlm_fusion.integrations import transformers_serve  # lazy: import time

    try:
        path = resolve_model(args.model)
    except ValueError as error:
        return fail(str(error))
    return transformers_serve.main(path, args.options)
