"""`vlm-fusion train`: one stage of the recipe (`vlm_fusion.training`), in this process or relaunched through
`accelerate launch` in several; and whether the process goes without bitsandbytes."""

import argparse
import os
import sys

from .common import FAMILY_NAMES, fail, positive_int

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


def add_arguments(p) -> None:
    p.description = ("One stage of the recipe on transformers' Trainer: from a vlm-fusion checkpoint (--model) or "
                     "from pretrained parts (--family, --vision-tower, --language-model), to a vlm-fusion checkpoint "
                     "with its processor and a model card recording the training.")
    data = p.add_argument_group("data")
    data.add_argument("--data", required=True, help="LLaVA JSON / JSON lines, or a local TRL-format dataset "
                      "(`messages` + `images`: a save_to_disk folder, .json/.jsonl or .parquet)")
    data.add_argument("--image-folder", help="the folder LLaVA-format image and video paths are relative to")
    data.add_argument("--num-frames", type=positive_int, help="frames sampled from each clip (`<video>` samples: a "
                      "video file or a frames folder); with --family, composes a model that reads clips")
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
    model.add_argument("--family", choices=FAMILY_NAMES, help="compose a new model of this family from parts")
    model.add_argument("--vision-tower", help="with --family: a vision checkpoint (CLIP, SigLIP, DINOv2, ViT, ...)")
    model.add_argument("--language-model", help="with --family: a causal LM checkpoint with its tokenizer")
    model.add_argument("--qformer-init", help="--stage qformer: a BERT checkpoint the Q-Former starts from "
                       "(BLIP-2: bert-base-uncased); its tokenizer becomes the Q-Former's")
    model.add_argument("--qformer-tokenizer", help="--stage qformer from scratch (no --qformer-init): the Q-Former's "
                       "tokenizer")
    model.add_argument("--bridge", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                       help="with --family: a bridge config field, e.g. projector_type=mlp2x_gelu, num_query_tokens=32; "
                       "with --model (an image checkpoint) and --num-frames: a field of the video path added, e.g. "
                       "video_pooling=average")
    model.add_argument("--lora", action="store_true", help="instruct: LoRA adapters on the LM instead of training it")
    model.add_argument("--qlora", action="store_true", help="instruct: the LM in 4-bit with LoRA adapters")
    model.add_argument("--lora-r", type=positive_int, default=128)
    model.add_argument("--lora-alpha", type=positive_int, default=256)
    model.add_argument("--train-tower", action="store_true", help="train the vision tower too (at --tower-lr)")
    model.add_argument("--train-output-embeddings", action="store_true", help="train the LM's output embeddings too "
                       "(at --lm-lr): with the LM frozen (--stage flamingo), the answers' words the tokenizer gained "
                       "keep their untrained rows and are never generated; an untied head only (OpenFlamingo trains "
                       "the input embeddings alone)")
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


def run(args, argv: list[str], own_process: bool = False) -> int:
    """One stage; `argv` is the command's (from "train" on), for a relaunch; `own_process`: this process is the
    command's (the console script, `python -m vlm_fusion_cli`), not a caller's that may quantise later."""
    if args.accelerate:  # relaunch through accelerate's launcher, N processes
        return launch(args, argv)
    if own_process:
        go_without_bitsandbytes_unless_needed(args)
    import dataclasses  # lazy, as every import of torch, transformers or vlm_fusion here: import time
    import logging

    from vlm_fusion.training import DataError, TrainOptions, train
    from vlm_fusion.training.distributed import end_process_group, is_main_process

    names = {f.name for f in dataclasses.fields(TrainOptions)}
    options = TrainOptions(**{k: v for k, v in vars(args).items() if k in names and k != "bridge"},
                           bridge=dict(args.bridge))
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU kernel notice, on every import
    main_process = is_main_process()  # under accelerate launch, one process speaks
    finished = False
    try:
        summary = train(options)
        finished = True
    except DataError as error:
        return fail(f"train: {error}") if main_process else 2
    finally:
        end_process_group(wait=finished)  # after a failure, no process waits for the others
    if not main_process:
        return 143 if "stopped_at" in summary else 0
    if "stopped_at" in summary:
        print(f"vlm-fusion train: stopped by SIGTERM after step {summary['stopped_at']}; its checkpoint is in "
              f"{options.output_dir}: run the same command with --resume to continue", file=sys.stderr)
        return 143
    loss = summary["final_loss"]
    print(f"vlm-fusion train: {summary['stage']} stage done: {summary['steps']} steps on {summary['samples']:,} "
          f"samples, final loss {loss:.4f}; the model is in {options.output_dir}" if loss is not None else
          f"vlm-fusion train: {summary['stage']} stage done; the model is in {options.output_dir}")
    return 0


# ---- bitsandbytes: the one place that decides --------------------------------------------------------------------
def needs_bitsandbytes(args) -> bool:
    """Whether a training run quantises: `--qlora`, or a part saved quantised (its config says so); a Hub id or a
    folder without a config is assumed to."""
    if args.qlora:
        return True
    for path in filter(None, (args.model, args.language_model, args.vision_tower)):
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            return True
        with open(config, encoding="utf-8") as f:
            if "quantization_config" in f.read():
                return True
    return False


def go_without_bitsandbytes_unless_needed(args) -> None:
    """In the command's own process only (a caller's may quantise later). peft, which transformers' Trainer imports,
    imports bitsandbytes eagerly, and bitsandbytes compiles its CPU kernels with torch.compile when imported: about a
    second of every launch and rerun. When nothing quantises the process goes without: peft and transformers then
    see bitsandbytes as not installed."""
    if not needs_bitsandbytes(args):
        sys.modules.setdefault("bitsandbytes", None)


# ---- several processes -------------------------------------------------------------------------------------------
def launch(args, argv: list[str]) -> int:
    """`accelerate launch --config_file CONFIG [--num_processes N] -m vlm_fusion_cli train <the other flags>`."""
    import importlib.util
    import subprocess

    config = args.accelerate
    if config in ACCELERATE_CONFIGS:  # vlm_fusion's folder, found without importing it
        package = importlib.util.find_spec("vlm_fusion").submodule_search_locations[0]
        config = os.path.join(package, "training", "accelerate", f"{config}.yaml")
    if not os.path.isfile(config):
        return fail(f"--accelerate takes {', '.join(ACCELERATE_CONFIGS)} or a config file; no file {config}")
    rest, skip = [], False
    for item in argv[1:]:  # drop --accelerate / --num-processes (and their values)
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
    return subprocess.call([*command, "-m", "vlm_fusion_cli", "train", *rest])
