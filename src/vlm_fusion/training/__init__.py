"""The training recipe: LLaVA's two stages (and Flamingo's, and BLIP-2's stage 1) for any vlm-fusion model, on
transformers' Trainer. Dependencies point down this list; nothing imports `recipe.py` back.

    recipe.py        `train(options)`: the stage's run (RUNS), handed to the runner
    generation.py    the stages of the generation families, `align` / `instruct` / `flamingo`: the model on
                     conversations, or (align) on image-caption pairs streamed from shards
    qformer.py       BLIP-2's stage 1 (`qformer`): the Q-Former's ITC + ITM + ITG on image-caption pairs, no LM
    runner.py        any stage's `Run` on the Trainer: resume, SIGTERM, the summary, the model card, loss.png
    trainer.py       `FusionTrainer` (per-part learning rates, throughput logs), `StreamReading`, the callbacks
    models.py        the generation model and processor to train (checkpoint or parts), freezing, LoRA / QLoRA
    conversations.py a data source: LLaVA JSON / TRL conversations -> the data pass -> `ConversationDataset`
    streaming.py     a data source: image-caption pairs streamed from WebDataset shards / a `datasets` dataset
    cache.py         the data pass, once: checked + encoded in workers into a memory-mapped Arrow cache, reused
    encoding.py      conversations -> token ids with each image's placeholders, and the labels (plain / chat layouts)
    data.py          LLaVA JSON / TRL conversational datasets -> conversations (a JSON list read object by object)
    options.py       `TrainOptions`: the flags of `vlm-fusion train`
    stages.py        the stages as plain data: what trains, at which learning rate
    watch.py         --report-to (TensorBoard, W&B through transformers) and the loss curve, loss.png
    distributed.py   which process this is; what accelerate needs on the CPU
    accelerate/      `accelerate launch` configs: DDP, FSDP2, DeepSpeed ZeRO-2 / ZeRO-3
"""

from .data import DataError
from .options import TrainOptions
from .stages import STAGES

__all__ = ["DataError", "STAGES", "TrainOptions", "train"]


def __getattr__(name: str):
    # `train` loads transformers' Trainer (and through it peft and bitsandbytes): only when asked for, so that what
    # only reads data (`vlm-fusion evaluate`, `vlm_fusion.evaluation`) imports this package without it
    if name == "train":
        from .recipe import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
