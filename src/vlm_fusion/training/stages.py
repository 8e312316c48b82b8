"""The recipe's stages as plain data: what each one trains, on which layout, at which learning rates. What a stage
runs on (its model, data, collator) is one function per kind of model, which `recipe.RUNS` names for each stage:
`generation.generation_run` (align, instruct, flamingo), `qformer.qformer_run` (qformer).

| stage      | layout | trains                                   | learning rates (defaults)             | as in                  |
|------------|--------|------------------------------------------|---------------------------------------|------------------------|
| `align`    | plain  | the bridge                               | bridge 1e-3                           | LLaVA `pretrain.sh`    |
| `instruct` | chat   | the bridge and the LM (or LoRA on it)    | bridge 2e-5, LM 2e-5 (LoRA 2e-4)      | LLaVA `finetune*.sh`   |
| `flamingo` | chat   | the bridge (resampler, gated blocks) and the LM's input embeddings | 1e-4        | OpenFlamingo           |
| `qformer`  | captions | BLIP-2's Q-Former with its stage-1 heads, no LM (ITC + ITM + ITG) | 1e-4 cosine to 1e-5 | LAVIS `pretrain_stage1.yaml` |

The vision tower stays frozen unless `train_tower` is set (then at `tower_lr`, LLaVA-OneVision's low rate).
The `plain` layout is LLaVA's `preprocess_plain`: the images, then the assistant's text (the caption) and an end
marker, the human turn dropped, the loss on the caption and the end; `chat` renders the conversation with the
model's chat template, the loss on the assistant turns only; `captions` reads (image, caption) pairs for BLIP-2's
stage 1 (`training/qformer.py`).
"""

from dataclasses import dataclass

@dataclass(frozen=True)
class Stage:
    name: str
    layout: str
    trains_language_model: bool  # the LM's base decoder and head (fully, or through LoRA)
    trains_input_embeddings: bool  # Flamingo: the embeddings of its new tokens (<image>, <|endofchunk|>)
    bridge_lr: float
    lm_lr: float
    lora_lr: float = 2e-4
    warmup: float = 0.03  # a fraction of the steps, as LLaVA's warmup_ratio
    weight_decay: float = 0.0
    min_lr_rate: float = 0.0  # the cosine schedule ends at this fraction of the peak rate


STAGES = {
    "align": Stage("align", layout="plain", trains_language_model=False, trains_input_embeddings=False,
                   bridge_lr=1e-3, lm_lr=0.0),
    "instruct": Stage("instruct", layout="chat", trains_language_model=True, trains_input_embeddings=False,
                      bridge_lr=2e-5, lm_lr=2e-5),
    "flamingo": Stage("flamingo", layout="chat", trains_language_model=False, trains_input_embeddings=True,
                      bridge_lr=1e-4, lm_lr=1e-4),
    "qformer": Stage("qformer", layout="captions", trains_language_model=False, trains_input_embeddings=False,
                     bridge_lr=1e-4, lm_lr=0.0, weight_decay=0.05, min_lr_rate=0.1),
}
TOWER_LR = 2e-6  # when the tower trains (LLaVA-OneVision trains it at a fifth of the LM's rate)
LORA = dict(r=128, lora_alpha=256, lora_dropout=0.05)  # LLaVA-1.5's LoRA
