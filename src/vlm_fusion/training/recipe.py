"""`vlm-fusion train`: one stage of the recipe, from a vlm-fusion checkpoint or from pretrained parts, to a
vlm-fusion checkpoint with its processor and a model card that records the training.

    --stage  ->  the stage's run (RUNS: its options and the output folder checked, its data read, its model loaded
    and frozen)  ->  the runner (runner.py: Trainer, resume, SIGTERM, summary, model card, loss.png)

Run it in one process (`vlm-fusion train ...`) or in several through accelerate's launcher
(`vlm-fusion train --accelerate ddp|fsdp2|zero2|zero3 --num-processes N ...`, or `accelerate launch -m
vlm_fusion_cli train ...` with a config of your own).
"""

from .data import DataError
from .generation import generation_run
from .options import TrainOptions
from .qformer import qformer_run
from .runner import run
from .stages import STAGES
from .watch import report_to

# each stage's run: a function of the options that returns a `runner.Run`
RUNS = {"align": generation_run, "instruct": generation_run, "flamingo": generation_run, "qformer": qformer_run}


def train(options: TrainOptions) -> dict:
    """Run one stage; returns a summary (stage, data, samples, steps, final loss, where the model is)."""
    if options.stage not in STAGES:
        raise DataError(f"--stage must be one of {', '.join(STAGES)}, got {options.stage!r}")
    report_to(options.report_to)  # its package missing: one line, before anything loads
    return run(RUNS[options.stage](options))
