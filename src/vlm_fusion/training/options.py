"""`TrainOptions`: everything one stage takes, named as `vlm-fusion train`'s flags."""

from dataclasses import dataclass, field

from .stages import LORA, TOWER_LR


@dataclass
class TrainOptions:
    """Everything one stage takes; the CLI's flags have the same names."""

    data: str  # LLaVA JSON / JSON lines, or a local TRL-format dataset
    output_dir: str
    stage: str = "instruct"  # align | instruct | flamingo | qformer
    image_folder: str | None = None  # the folder image and clip paths are relative to
    num_frames: int | None = None  # frames sampled a clip; with parts, composes a model that reads clips
    model: str | None = None  # a vlm-fusion checkpoint to start from ...
    family: str | None = None  # ... or parts: llava | blip2 | flamingo
    vision_tower: str | None = None
    language_model: str | None = None
    qformer_init: str | None = None  # --stage qformer: a BERT checkpoint the Q-Former starts from (BLIP-2's)
    qformer_tokenizer: str | None = None  # --stage qformer from scratch: the Q-Former's tokenizer
    bridge: dict = field(default_factory=dict)  # the family's config fields (projector_type, num_query_tokens, ...)
    layout: str | None = None  # plain | chat (default: the stage's)
    chat_template: str | None = None  # a Jinja chat template, or a file holding one (default: the processor's)
    plain_end: str | None = None  # what ends a plain sample (default "\n"; Flamingo's <|endofchunk|>)
    max_length: int = 2048
    skip_too_long: bool = False  # skip longer samples (with a count) instead of refusing the data
    streaming: bool = False  # stream image-caption pairs (training/streaming.py); WebDataset shards always are
    bridge_lr: float | None = None
    lm_lr: float | None = None
    train_tower: bool = False
    # the LM's output embeddings too (its frozen-LM stage, flamingo, would not learn answers in words it added)
    train_output_embeddings: bool = False
    tower_lr: float = TOWER_LR
    lora: bool = False
    qlora: bool = False
    lora_r: int = LORA["r"]
    lora_alpha: int = LORA["lora_alpha"]
    batch_size: int = 8  # per process
    gradient_accumulation: int = 1
    epochs: float = 1.0
    max_steps: int = -1
    warmup: float | None = None  # a fraction of the steps (< 1) or a number of steps (default: the stage's 0.03)
    weight_decay: float | None = None
    bf16: bool = False
    gradient_checkpointing: bool = False
    group_by_length: bool = False
    logging_steps: int | None = None  # default: scaled to the run (trainer.logging_interval)
    save_steps: int = 500
    seed: int = 0
    workers: int = 0
    eval_data: str | None = None  # held-out samples (the formats of `data`): their loss every `eval_steps`
    eval_steps: int | None = None  # default: `save_steps`
    data_cache: str | None = None  # the data pass's cache folder (default: $VLM_FUSION_DATA_CACHE or ~/.cache/...)
    data_workers: int | None = None  # processes of the data pass (default: one per core; 0: in this process)
    clear_data_cache: bool = False  # remove the data cache's folders this run does not use
    resume: bool = False
    overwrite: bool = False
    report_to: str = "none"  # tensorboard | wandb | none: transformers' integration the logs also go to
