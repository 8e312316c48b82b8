"""The training recipe: LLaVA's two stages (and Flamingo's) for any vlm-fusion model, on transformers' Trainer.

    data.py      LLaVA JSON / TRL conversational datasets -> conversations, checked before training
    encoding.py  conversations -> token ids with each image's placeholders, and the labels (plain / chat layouts)
    stages.py    the stages as plain data: what trains, at which learning rate
    trainer.py   dataset, collator, per-part learning rates, throughput logs, SIGTERM -> checkpoint
    recipe.py    one stage end to end: model (checkpoint or parts) -> data -> Trainer -> checkpoint + card
    accelerate/  `accelerate launch` configs: DDP, FSDP2, DeepSpeed ZeRO-2 / ZeRO-3
"""

from .data import DataError
from .recipe import TrainOptions, train
from .stages import STAGES

__all__ = ["DataError", "STAGES", "TrainOptions", "train"]
