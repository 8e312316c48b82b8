"""The training recipe: LLaVA's two stages (and Flamingo's) for any vlm-fusion model, on transformers' Trainer.

    data.py      LLaVA JSON / TRL conversational datasets -> conversations (a JSON list read object by object)
    encoding.py  conversations -> token ids with each image's placeholders, and the labels (plain / chat layouts)
    cache.py     the data pass, once: checked + encoded in workers into a memory-mapped Arrow cache, reused
    streaming.py image-caption pairs streamed from WebDataset shards / a `datasets` dataset (align, qformer)
    stages.py    the stages as plain data: what trains, at which learning rate
    trainer.py   dataset, collator, per-part learning rates, throughput logs, SIGTERM -> checkpoint
    recipe.py    one stage end to end: model (checkpoint or parts) -> data -> Trainer -> checkpoint + card
    watch.py     --report-to (TensorBoard, W&B through transformers) and the loss curve, loss.png
    accelerate/  `accelerate launch` configs: DDP, FSDP2, DeepSpeed ZeRO-2 / ZeRO-3
"""

from .data import DataError
from .recipe import TrainOptions, train
from .stages import STAGES

__all__ = ["DataError", "STAGES", "TrainOptions", "train"]
