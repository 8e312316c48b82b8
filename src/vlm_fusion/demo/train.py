"""Train the demo checkpoints shipped in `vlm_fusion/demo/checkpoints/` (seeded; reproduces them):

    python -m vlm_fusion.demo.train --out src/vlm_fusion/demo/checkpoints

1. Pretrain a tiny CLIP-style vision encoder (one patch per grid cell, trained to name each cell's shape, colour and
   column) and a tiny Llama LM on the task's text, where the scene is written one word per grid cell in place of the
   image ("empty red_circle_middle empty ..."), so that freezing them later is meaningful and the LM already knows
   how to answer from such a context; stage 1 then only has to map the image onto it. "Is the X left of the Y ?" is
   answered with its reasoning first ("the X is middle , the Y is left , so no"): a 4-layer LM does not learn the
   comparison in one token within the budget. These two are saved as pretrained parts, as a user would have them.
2. Write the task in LLaVA's format (a JSON list of conversations and a folder of PNG images) and, for each family,
   run the recipe of `vlm-fusion train` (`vlm_fusion.training`): the `align` stage composes the model from the parts
   and trains the bridge on captions (asked as a question: the chat layout, not LLaVA's plain one), then `instruct`
   (LLaVA- and BLIP-2-style: bridge + LM) or `flamingo` (resampler + gated cross-attention + input embeddings, the
   LM frozen) on the questions. The tower stays frozen. The BLIP-2-style model first goes through BLIP-2's stage 1
   (`qformer`: ITC + ITM + ITG on the captions, no LM; the Q-Former from scratch with a BERT-style tokenizer of the
   task's words), and its `align` stage starts from that Q-Former; `--ablation` also trains it without stage 1.
3. The video stage (`vlm_fusion.demo.clips`: 8-frame clips whose questions no single frame answers): each image
   model learns the clips' words (its tokenizer and LM embeddings grow by them) and `vlm-fusion train --num-frames 8`
   adds its video path (LLaVA-NeXT-Video's start from LLaVA-NeXT) and trains it, as the second stage did, on clips
   and the image questions mixed, so that the image answers stay; the LLaVA-style model's LM first learns the clips
   written as text (`clip_text_stage`), as in step 1; the BLIP-2-style model's does too, and its tower then learns the
   cells' rows (`cell_rows_stage`) and its queries to write each frame as those words (`query_words_stage`) before a
   video stage six times longer (`QUERY_WORDS_STEPS`; `--no-query-words`: the video stage alone, 500 steps); the
   Flamingo-style model's tower learns the rows too (its resampler, like a Q-Former, reads the patches as a set)
   before a video stage 24 times longer that trains its LM's output embeddings as well (`VIDEO_STEPS`).
   `--video-from DIR` starts this stage from image models already trained (`DIR/llava`, `DIR/blip2`,
   `DIR/flamingo`) instead of training them first; `--work DIR` keeps the stages before it for a later run.
4. Evaluate on held-out scenes and clips and write each model card with its training and the accuracy per question
   type; the stage-1 Q-Former's held-out image-text retrieval (`vlm-fusion evaluate retrieval`'s procedure) is printed.
"""

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    get_cosine_schedule_with_warmup,
)
from transformers.utils import logging as hf_logging

import vlm_fusion
from vlm_fusion.demo import card_usage, clips, shapes
from vlm_fusion.model_card import write_model_card
from vlm_fusion.processing_base import chat_template
from vlm_fusion.tools.tiny import tiny_bert_tokenizer, tiny_tokenizer
from vlm_fusion.training import TrainOptions
from vlm_fusion.training import train as train_stage
from vlm_fusion.training.runner import training_section

SEED = 0
VISION = dict(model_type="clip_vision_model", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
              num_attention_heads=4, image_size=shapes.IMAGE_SIZE, patch_size=32)
TEXT = dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)
FAMILY_CONFIG = {
    "fusion_llava": dict(projector_type="mlp2x_gelu", vision_feature_layer=-1),
    "fusion_blip2": dict(num_query_tokens=16, qformer_hidden_size=128, qformer_num_hidden_layers=2,
                         qformer_num_attention_heads=4, qformer_intermediate_size=256, cross_attention_frequency=1,
                         qformer_dropout=0.0),
    "fusion_flamingo": dict(num_latents=16, perceiver_depth=2, perceiver_heads=4, perceiver_head_dim=32,
                            cross_attention_heads=4, cross_attention_head_dim=32, cross_attention_every_n_layers=1),
}
# rows: the tower's steps on the cells' rows before the video stage (`cell_rows_stage`; `QUERY_WORDS_STEPS`,
# `VIDEO_STEPS`); words: the BLIP-2-style route to time, for `QUERY_WORD_FAMILIES` only (`QUERY_WORDS_STEPS`)
STEPS = dict(vision=800, lm=5000, qformer=600, align=300, instruct=1000, clip_text=6000, rows=0, words=0,
             video=500)  # --quick: / 10
# the route's steps (`--no-query-words`: none); its video stage is six times longer, on six times the clips
QUERY_WORDS_STEPS = dict(rows=400, words=3000, video=3000)
# the families whose video stage is longer than `STEPS`'s; clips: the clips it reads (and as many image questions;
# default: each sample read twice). The Flamingo-style one, its LM frozen: 24 times longer, on the clips of a
# 3,000-step stage (each sample read eight times), after its tower has learned the rows (a Perceiver's latents, as a
# Q-Former's queries, read the patches as a set; README: its trials at 6,000 and 9,000 steps)
VIDEO_STEPS = {"fusion_flamingo": dict(rows=400, video=12000, clips=24000)}
# the families whose LM learns the clips from their text before the video stage (`clip_text_stage`): those whose
# frame tokens stand where the scene's words stand, and those of `QUERY_WORD_FAMILIES` taught so (`words` steps)
CLIP_TEXT_FAMILIES = ("fusion_llava",)
# the families whose bridge reads the patches as a set: with `words` steps, their LM learns the clips as text, their
# tower the rows (`cell_rows_stage`) and their queries the words (`query_words_stage`)
QUERY_WORD_FAMILIES = ("fusion_blip2",)
# BLIP-2's stage 1 on the demo's Q-Former: its sizes above, a 64-wide contrastive space, captions of at most 32 tokens
QFORMER = dict(embed_dim=64, max_text_length=32)
STAGE2_LR = 1e-3
# "what colour is the X ?" takes the LM longest to learn (48 cell words to match "X" against): half the questions
QUESTION_MIX = ("colour", "left_of", "colour", "shape", "colour", "count")


def image_processor():
    size = shapes.IMAGE_SIZE
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def pixels(images) -> torch.Tensor:
    return image_processor()(images, return_tensors="pt")["pixel_values"]


# ---- 1. pretraining the parts ---------------------------------------------------------------------------------
def cell_targets(scene, rows: bool = False):
    """Per grid cell, in the reading order of `shapes.cell_index`: shape index and colour index (0 for an empty cell)
    and the column, the three things `shapes.grid_text` names; with `rows`, each cell's row too."""
    shape, colour = [0] * shapes.GRID**2, [0] * shapes.GRID**2
    for item in scene:
        shape[shapes.cell_index(item)] = shapes.SHAPES.index(item.shape) + 1
        colour[shapes.cell_index(item)] = list(shapes.COLOURS).index(item.colour) + 1
    cells = range(shapes.GRID**2)
    return shape, colour, [cell % shapes.GRID for cell in cells], *([[cell // shapes.GRID for cell in cells]] * rows)


def pretrain_vision(steps: int, batch: int = 64, learning_rate: float = 6e-4) -> CLIPVisionModel:
    """A CLIP-style tower with one patch per grid cell, trained so that its k-th patch token names the shape, colour
    and column of the k-th cell (row by row, as `shapes.grid_text` writes the scene for the LM).
    The classification heads are dropped afterwards."""
    assert VISION["image_size"] // VISION["patch_size"] == shapes.GRID, "one patch per grid cell"
    torch.manual_seed(SEED)
    tower = CLIPVisionModel(AutoConfig.for_model(**VISION))
    loss = train_on_cells(tower, steps, batch, learning_rate, SEED + 1, "pretraining the vision tower")
    print(f"vision tower: final cell loss {loss:.3f}")
    return tower.eval()


def train_on_cells(tower, steps: int, batch: int, learning_rate: float, seed: int, desc: str,
                   rows: bool = False) -> float:
    """`tower`'s k-th patch token learns to name what `cell_targets` gives for the k-th cell (with `rows`, its row
    too) through a cosine classifier, on scenes drawn from `seed`; the last step's loss."""
    import numpy as np

    patches = (tower.config.image_size // tower.config.patch_size) ** 2
    if patches != shapes.GRID**2:
        raise ValueError(f"The demo's cells need a tower with one patch per grid cell ({shapes.GRID**2}); this one has "
                         f"{patches}.")
    # A cosine classifier: each attribute must take a large share of a cell feature's norm, so that the bridges
    # trained later find them all (with a plain linear head, colour hid in a direction of tiny variance).
    groups = [len(shapes.SHAPES) + 1, len(shapes.COLOURS) + 1, shapes.GRID] + [shapes.GRID] * rows
    prototypes = nn.Parameter(torch.randn(sum(groups), tower.config.hidden_size))
    rng = np.random.default_rng(seed)

    def loss_at(step):
        scenes = [shapes.sample_scene(rng) for _ in range(batch)]
        features = tower(pixels([shapes.render(s) for s in scenes]), output_hidden_states=True).hidden_states[-1]
        cell_features = nn.functional.normalize(features[:, 1:], dim=-1)  # (B, 9, D): the patch tokens, CLS dropped
        logits = 16 * cell_features @ nn.functional.normalize(prototypes, dim=-1).T  # (B, 9, classes)
        targets = torch.tensor([cell_targets(s, rows) for s in scenes])  # (B, 3 or 4, 9)
        return sum(nn.functional.cross_entropy(group.flatten(0, 1), targets[:, i].flatten())
                   for i, group in enumerate(logits.split(groups, dim=-1)))
    return minimise(list(tower.parameters()) + [prototypes], steps, learning_rate, loss_at, desc,
                    clip=list(tower.parameters()))


def pretrain_lm(tokenizer, steps: int, batch: int = 64, learning_rate: float = 2e-3):
    """A tiny Llama trained on the task's text alone: the scene's description stands where the image will be, so the
    model learns to answer from its context (which object has which colour, where) before it ever sees an image.
    It trains on one thread: whether the 4-layer LM learns every question type within the budget turned on the
    order of the float reductions (on two threads it ended at a loss of 0.015 and its models at 89.5 % on left_of;
    on one, 0.002 and 100 % on every question type read from the text). The budget is not forgiving either: with
    transformers 5.24 and torch 2.13, 3,000 steps ended at 0.007 and 98 % on left_of read from the text (the second
    object's column), 4,000 at 0.015 and 84 %, 5,000 at 0.000 and 100 % on every type."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TEXT, vocab_size=len(tokenizer)))
    # A cell word ("red_circle_middle") starts as the sum of its parts' embeddings, so that "circle" in a question
    # already resembles every cell holding a circle; without it, which question type the LM learns within the
    # budget depends on the seed and the mix.
    embeddings = lm.get_input_embeddings().weight
    with torch.no_grad():
        for word, parts in shapes.CELL_WORDS.items():
            parts_sum = embeddings[tokenizer.convert_tokens_to_ids(list(parts))].sum(0)
            embeddings[tokenizer.convert_tokens_to_ids(word)] = parts_sum
    data = shapes.examples(SEED + 2, steps * batch // 4, kinds=QUESTION_MIX + ("caption",), as_text=True)
    # the loss is on the answers only, as in the instruction tuning to come: the context is random scene text
    loss = train_on_text(lm, tokenizer.pad_token_id, [text_items(tokenizer, shapes.PROMPT, "<image>", data)], steps,
                         batch, learning_rate, "pretraining the language model")
    print(f"language model: final loss {loss:.3f}")
    torch.set_num_threads(threads)
    return lm.eval()


def text_items(tokenizer, prompt: str, marker: str, data) -> list[tuple]:
    """Text-only items `(None, prompt ids, answer ids)` (the answer ends with EOS) of `(text, kind, question, answer)`
    examples, each example's text written where `prompt` has `marker`."""
    eos = tokenizer.eos_token_id
    return [(None, tokenizer(prompt.replace(marker, text).format(question=q))["input_ids"],
             tokenizer(" " + a, add_special_tokens=False)["input_ids"] + [eos]) for text, _, q, a in data]


def train_on_text(lm, pad_id: int, sources: list[list], steps: int, batch: int, learning_rate: float,
                  desc: str) -> float:
    """AdamW on `lm`'s trainable parameters, cosine decay after a twentieth of the steps' warm-up, the loss on the
    answers of `text_items`: step k's batch is the next `batch` items of `sources[k % len(sources)]` (each source
    read in order and cycled). The last step's loss."""
    batches = collate(pad_id)

    def loss_at(step):
        items, start = sources[step % len(sources)], step // len(sources) * batch
        return lm(**batches([items[(start + i) % len(items)] for i in range(batch)])).loss
    return minimise([p for p in lm.parameters() if p.requires_grad], steps, learning_rate, loss_at, desc)


def minimise(parameters: list, steps: int, learning_rate: float, loss_at, desc: str, weight_decay: float = 0.01,
             clip: list | None = None) -> float:
    """AdamW on `parameters` (torch's default weight decay unless given), cosine decay after a twentieth of the
    steps' warm-up: step k takes a step on `loss_at(k)`, the gradients of `clip` (if given) clipped to norm 1 first.
    The demo's own pretraining loops; the last step's loss."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)
    progress = tqdm(range(steps), desc=desc)
    for step in progress:
        loss = loss_at(step)
        optimizer.zero_grad()
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(clip, 1.0)
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return loss.item()


# ---- 2. the families, through the recipe --------------------------------------------------------------------------
def collate(pad_id):
    """(None, prompt ids, answer ids) -> a right-padded batch, the loss on the answers (the LM's text pretraining)."""
    def collate_fn(batch):
        length = max(len(p) + len(a) for _, p, a in batch)
        ids = torch.full((len(batch), length), pad_id)
        labels = torch.full((len(batch), length), -100)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, (_, prompt, answer) in enumerate(batch):
            sequence = prompt + answer
            ids[row, : len(sequence)] = torch.tensor(sequence)
            labels[row, len(prompt) : len(sequence)] = torch.tensor(answer)
            mask[row, : len(sequence)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return collate_fn


def family_steps(family: str | None = None, query_words: bool = True, quick: bool = False) -> dict:
    """The steps of each stage for `family`: `STEPS`, its `VIDEO_STEPS` and, for `QUERY_WORD_FAMILIES` unless not
    `query_words`, the route's (`QUERY_WORDS_STEPS`); a tenth of each (but a 0) with `quick`."""
    route = query_words and family in QUERY_WORD_FAMILIES
    steps = {**STEPS, **VIDEO_STEPS.get(family, {}), **(QUERY_WORDS_STEPS if route else {})}
    return {k: max(2, v // 10) if quick and v else v for k, v in steps.items()}


def pretrained_parts(root, steps) -> tuple[str, str]:
    """The pretrained tower (with its image processor) and LM (with its tokenizer) as checkpoints in `root`: those
    already there are kept, the others pretrained and saved."""
    vision, language = os.path.join(root, "vision"), os.path.join(root, "lm")
    if not os.path.isfile(os.path.join(vision, "config.json")):
        pretrain_vision(steps["vision"]).save_pretrained(vision)
        image_processor().save_pretrained(vision)
    if not os.path.isfile(os.path.join(language, "config.json")):
        tokenizer = tiny_tokenizer(shapes.VOCABULARY)
        pretrain_lm(tokenizer, steps["lm"]).save_pretrained(language)
        tokenizer.save_pretrained(language)
    return vision, language


def write_llava_data(root, name: str, examples, images: str) -> str:
    """`examples` in LLaVA's format: `<name>.json`, its images as PNG files `<images>_<position>.png` in
    `root/images` (data sets drawn from the same seed share theirs)."""
    folder = os.path.join(root, "images")
    os.makedirs(folder, exist_ok=True)
    rows = []
    for index, (image, _, question, answer) in enumerate(tqdm(examples, desc=f"writing {name}", leave=False)):
        file = f"{images}_{index}.png"
        if not os.path.exists(os.path.join(folder, file)):
            image.save(os.path.join(folder, file))
        rows.append({"id": f"{name}_{index}", "image": file, "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
    path = os.path.join(root, f"{name}.json")
    with open(path, "w") as f:
        json.dump(rows, f)
    return path


def task_data(root, steps, families) -> dict:
    """Stage 1's captions and stage 2's question mixture (Flamingo's is 4x longer; the others take its start), for
    the families to train."""
    captions = shapes.examples(SEED + 3, steps["align"] * 32 // 2, kinds=("caption",))
    flamingo = "fusion_flamingo" in families
    mixture = shapes.examples(SEED + 4, steps["instruct"] * (4 if flamingo else 1) * 32 // 2,
                              kinds=QUESTION_MIX * 2 + ("caption",))
    short = steps["instruct"] * 32 // 2  # each sample seen twice in the instruct stage
    data = {"captions": write_llava_data(root, "shapes_captions", captions, "caption"),
            "mixture": write_llava_data(root, "shapes_questions", mixture[:short], "question")}
    if flamingo:
        data["mixture_long"] = write_llava_data(root, "shapes_questions_long", mixture, "question")
    return data


ORIGIN = ("Trained from scratch by `python -m vlm_fusion.demo.train` on the synthetic shapes task of "
          "`vlm_fusion.demo.shapes` (seeded): a tiny CLIP-style tower and a tiny Llama pretrained on the task, then "
          "the recipe of `vlm-fusion train`: the align stage (bridge only, on captions) and the {stage} stage "
          "(questions).")
ORIGIN_STAGE1 = ("Trained from scratch by `python -m vlm_fusion.demo.train` on the synthetic shapes task of "
                 "`vlm_fusion.demo.shapes` (seeded): a tiny CLIP-style tower and a tiny Llama pretrained on the task, "
                 "then the recipe of `vlm-fusion train`: BLIP-2's stage 1 (the Q-Former with ITC + ITM + ITG on "
                 "captions, no LM), the align stage from it (Q-Former and projection, the LM frozen) and the {stage} "
                 "stage (questions).")


def train_qformer(vision, data, steps, work) -> str:
    """BLIP-2's stage 1 (`vlm-fusion train --stage qformer`) on the captions: the demo's Q-Former from scratch, with a
    BERT-style tokenizer of the task's words; returns the stage-1 checkpoint."""
    tokenizer = os.path.join(work, "qformer_tokenizer")
    tiny_bert_tokenizer(shapes.VOCABULARY).save_pretrained(tokenizer)
    out = os.path.join(work, "blip2", "qformer")
    train_stage(TrainOptions(
        data=data["captions"], image_folder=os.path.join(work, "images"), output_dir=out, stage="qformer",
        vision_tower=vision, qformer_tokenizer=tokenizer, bridge={**FAMILY_CONFIG["fusion_blip2"], **QFORMER},
        batch_size=32, seed=SEED, max_steps=steps["qformer"], bridge_lr=1e-3, warmup=max(1, steps["qformer"] // 20),
        logging_steps=max(1, steps["qformer"] // 5), save_steps=10**9))
    return out


def evaluate_retrieval(model_dir, root, seed: int = 12345, count: int = 200) -> dict:
    """LAVIS's retrieval metrics of a stage-1 Q-Former on held-out captioned scenes (seed 12345)."""
    from vlm_fusion.evaluation import retrieval

    path = write_llava_data(root, "heldout_captions", shapes.examples(seed, count, kinds=("caption",)), "heldout")
    model, processor = retrieval.load(model_dir)
    return retrieval.evaluate(model, processor, retrieval.read_samples(path, os.path.join(root, "images")))


def question_stage(family: str) -> str:
    """The stage that trains `family` on questions (the second, and the video stage): Flamingo-style models keep their
    LM frozen (`flamingo`), the others train it (`instruct`)."""
    return "flamingo" if family == "fusion_flamingo" else "instruct"


def train_family(family, vision, language, data, steps, work, stage1: str | None = None):
    """The two stages of `family` with `vlm_fusion.training`, as `vlm-fusion train` runs them (the BLIP-2-style
    model's `align` from the stage-1 Q-Former `stage1`, if given); the trained model, its processor and the second
    stage's summary."""
    flamingo = family == "fusion_flamingo"
    stage2 = question_stage(family)
    common = dict(image_folder=os.path.join(work, "images"), batch_size=32, seed=SEED, weight_decay=0.0,
                  logging_steps=max(1, steps["align"] // 5), save_steps=10**9, max_length=256)
    name = vlm_fusion.FAMILIES[family].name
    origin = ORIGIN_STAGE1 if stage1 else ORIGIN
    bridge = {**FAMILY_CONFIG[family], "origin": origin.format(stage=stage2), "license": "apache-2.0"}
    align = os.path.join(work, name + ("" if stage1 or family != "fusion_blip2" else "_without_stage1"), "align")
    # Every family's answers end with the LM's eos (Flamingo's own template ends them with <|endofchunk|>, which a
    # frozen, untied LM head cannot learn to emit), and an image part renders as `<image>\n`, as the LLaVA-format
    # data writes it, so that a chat with image parts (lmms-eval's, vLLM's) renders as the text trained on
    template = chat_template(end_of_turn="eos_token") if flamingo else None
    parts = dict(model=stage1, language_model=language, bridge={"origin": bridge["origin"], "license": "apache-2.0"}) \
        if stage1 else dict(family=name, vision_tower=vision, language_model=language, bridge=bridge)
    train_stage(TrainOptions(data=data["captions"], output_dir=align, stage="align", layout="chat",
                             chat_template=template, max_steps=steps["align"], bridge_lr=1e-3,
                             warmup=max(1, steps["align"] // 20), **parts, **common))
    # Flamingo-style keeps its LM frozen: only the resampler and the gated blocks learn to answer, which takes longer;
    # BLIP-2-style reads each cell through 16 queries, not the cell's own token, and still mistook a few squares for
    # circles after 1,000 steps (98.5 % on shape)
    instruct = int(steps["instruct"] * {"fusion_flamingo": 4, "fusion_blip2": 1.5}.get(family, 1))
    tuned = os.path.join(os.path.dirname(align), stage2)
    summary = train_stage(TrainOptions(
        data=data["mixture_long" if flamingo else "mixture"], output_dir=tuned, stage=stage2, model=align,
        max_steps=instruct, bridge_lr=STAGE2_LR, lm_lr=STAGE2_LR, warmup=max(1, instruct // 20),
        **{**common, "logging_steps": max(1, instruct // 5)}))
    return AutoModelForImageTextToText.from_pretrained(tuned).eval(), AutoProcessor.from_pretrained(tuned), summary


# ---- 3. the video stage ----------------------------------------------------------------------------------------
CLIP_WORDS = [word for word in clips.VOCABULARY if word != "<video>"]  # `<video>` comes with the video path


def write_clip_data(root, name: str, examples, prefix: str) -> list[dict]:
    """`examples` (clips) as LLaVA-Video's layout has them, each clip a frames folder `<prefix>_<position>/` of numbered
    PNG files in `root/images/clips` (lossless: the demo's colours stay exact); the rows."""
    rows = []
    for index, (frames, _, question, answer) in enumerate(tqdm(examples, desc=f"writing {name}", leave=False)):
        folder = f"clips/{prefix}_{index}/"
        path = os.path.join(root, "images", folder)
        if not os.path.isdir(path):
            os.makedirs(path)
            for position, frame in enumerate(frames):
                frame.save(os.path.join(path, f"{position:03d}.png"))
        rows.append({"id": f"{name}_{index}", "video": folder, "conversations": [
            {"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}]})
    return rows


def clip_count(steps, images: bool = True, batch_size: int = 32) -> int:
    """The clips of the video stage's data: `steps["clips"]`, or as many as make every sample seen twice (half of them
    image questions with `images`)."""
    return steps.get("clips") or steps["video"] * batch_size // (4 if images else 2)


def video_data(root, steps, num_frames: int = clips.NUM_FRAMES, images: bool = True, batch_size: int = 32) -> str:
    """The video stage's data: `clip_count` clips and as many of the second stage's image questions, alternating, or
    clips only (`images=False`)."""
    count = clip_count(steps, images, batch_size)
    videos = write_clip_data(root, "clips", clips.examples(SEED + 5, count, num_frames=num_frames),
                             f"clip{num_frames}")
    rows = videos
    if images:
        with open(write_llava_data(root, "video_stage_images", shapes.examples(
                SEED + 6, count, kinds=QUESTION_MIX * 2 + ("caption",)), "video_stage")) as f:
            rows = [row for pair in zip(videos, json.load(f)) for row in pair]
    path = os.path.join(root, f"{'clips_and_images' if images else 'clips'}_{num_frames}_{len(rows)}.json")
    with open(path, "w") as f:
        json.dump(rows, f)
    return path


def with_clip_words(image_model: str, out: str) -> str:
    """The image model `image_model` with the clips' words in its tokenizer and rows for them in its LM embeddings
    (input and output; new rows as transformers initialises them), saved to `out`."""
    from tokenizers import AddedToken

    model = AutoModelForImageTextToText.from_pretrained(image_model)
    processor = AutoProcessor.from_pretrained(image_model)
    tokenizer = processor.tokenizer
    tokenizer.add_tokens([AddedToken(word, single_word=True, normalized=False) for word in CLIP_WORDS
                          if word not in tokenizer.get_vocab()])
    model.resize_token_embeddings(max(len(tokenizer), model.get_input_embeddings().num_embeddings))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


FILLER = ","  # the word that stands for a frame's tokens beyond its cells' in the text stage (a BLIP-2 query's)


def tokens_per_grid(config) -> int:
    """The tokens the LM reads for one image or frame of the demo: a BLIP-2-style model's queries, else one per
    patch (a grid cell)."""
    return getattr(config, "num_query_tokens", shapes.GRID**2)


def with_fillers(data, count: int) -> list:
    """Text examples `(text, kind, question, answer)` (`as_text`: grids of cell words, one after another), each grid
    followed by `count` `FILLER` words, so that a grid spans as many tokens as the frame the model will read."""
    cells = shapes.GRID**2
    out = []
    for text, *rest in data:
        words = text.split()
        grids = [words[i : i + cells] + [FILLER] * count for i in range(0, len(words), cells)]
        out.append((" ".join(word for grid in grids for word in grid), *rest))
    return out


def once(out: str, name: str, steps: int, run) -> float:
    """A stage run once into `out`: `run()` trains and returns `(model, processor, last loss)`, which are saved there
    with `out/<name>.json`; a later call with the same `out` returns the loss kept in it."""
    done = os.path.join(out, f"{name}.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)["final_loss"]
    model, processor, loss = run()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    with open(done, "w") as f:
        json.dump({"steps": steps, "final_loss": loss}, f)
    return loss


def clip_text_stage(model_path: str, out: str, steps: int, batch: int = 64, learning_rate: float = 1e-3) -> float:
    """The LM of the model at `model_path` learns time from clips written as text (`clips.clip_text`: each frame's
    grid words, frame after frame) before its video stage, as the image demo's LM learned the scenes from their words
    before it saw an image. For the LLaVA-style model, stage 1 mapped each patch onto its cell's word, so frame tokens
    stand where those words stand and what the LM learns from the words carries over to frames; the BLIP-2-style
    model's queries are taught the words after it (`query_words_stage`), each grid followed by `FILLER` words for its
    queries beyond the cells. Half the batches are the clips' questions, half the image questions as text (their
    answers stay). On one thread, as `pretrain_lm`. Saved to `out` once (`once`); the last step's loss."""
    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        torch.manual_seed(SEED)
        model = AutoModelForImageTextToText.from_pretrained(model_path)
        processor = AutoProcessor.from_pretrained(model_path)
        tokenizer, count = processor.tokenizer, steps * batch // 4  # each source read twice
        fillers = tokens_per_grid(model.config) - shapes.GRID**2
        sources = [text_items(tokenizer, clips.PROMPT, "<video>", with_fillers(
                       clips.examples(SEED + 7, count, as_text=True), fillers)),
                   text_items(tokenizer, shapes.PROMPT, "<image>", with_fillers(shapes.examples(
                       SEED + 8, count, kinds=QUESTION_MIX + ("caption",), as_text=True), fillers))]
        model.train()
        loss = train_on_text(model, tokenizer.pad_token_id, sources, steps, batch, learning_rate,
                             "the language model on clips written as text")
        print(f"language model on clips written as text: final loss {loss:.3f}")
        torch.set_num_threads(threads)
        return model, processor, loss
    return once(out, "clip_text", steps, run)


def cell_rows_stage(model_path: str, out: str, steps: int, batch: int = 64, learning_rate: float = 6e-4) -> float:
    """The model's tower learns each patch's row besides its cell's shape, colour and column (`train_on_cells`).
    The demo's tower was pretrained for an LM that reads a patch's row from its place in the sequence, as it reads
    the grid's words; a Q-Former's queries read the patches as a set, and found the row in a patch's feature at 57 %
    (a linear probe; chance 33 %): no question about up or down could be answered. A Perceiver's latents read them
    so too: the Flamingo-style model trained without this stage told left from right in 45 of 46 held-out clips, up
    from down in 27 of 54. Saved to `out` once (`once`)."""
    def run():
        torch.manual_seed(SEED)
        model = AutoModelForImageTextToText.from_pretrained(model_path)
        tower = model.model.vision_tower
        loss = train_on_cells(tower, steps, batch, learning_rate, SEED + 9, "the tower on the cells' rows", rows=True)
        print(f"vision tower with rows: final cell loss {loss:.3f}")
        return model, AutoProcessor.from_pretrained(model_path), loss
    return once(out, "cell_rows", steps, run)


def query_words_stage(model_path: str, out: str, steps: int, batch: int = 64, learning_rate: float = 1e-3) -> float:
    """The BLIP-2-style model's Q-Former and projection learn to write an image as its LM reads it written as text
    (`with_fillers`): the k-th query token lands on the LM's input embedding of the k-th cell's word, the queries
    beyond the cells on `FILLER`'s (squared distance, plus a cross-entropy over the scene words by distance, which
    breaks the early plateau where every query sits at the mean word). The tower and LM stay frozen. So what the LM
    learned from the clips as text (`clip_text_stage`) carries over to frames, as it does for the LLaVA-style model.
    Saved to `out` once (`once`)."""
    import numpy as np

    def run():
        torch.manual_seed(SEED)
        model = AutoModelForImageTextToText.from_pretrained(model_path)
        processor = AutoProcessor.from_pretrained(model_path)
        tokenizer = processor.tokenizer
        embeddings = model.get_input_embeddings().weight.detach()
        if tokens_per_grid(model.config) < shapes.GRID**2:
            raise ValueError(f"Writing a scene's {shapes.GRID**2} cell words takes as many queries; this model has "
                             f"{tokens_per_grid(model.config)}.")
        fillers = [FILLER] * (tokens_per_grid(model.config) - shapes.GRID**2)
        words = torch.tensor(sorted(set(tokenizer.convert_tokens_to_ids([*shapes.CELL_WORDS, "empty", FILLER]))))
        model.requires_grad_(False)
        bridge = [model.model.vision_layernorm, model.model.qformer, model.model.language_projection]
        parameters = [p for module in bridge for p in module.parameters()]
        for parameter in parameters:
            parameter.requires_grad_(True)
        rng = np.random.default_rng(SEED + 10)

        def loss_at(step):
            scenes = [shapes.sample_scene(rng) for _ in range(batch)]
            tokens = model.model.get_image_features(pixels([shapes.render(s) for s in scenes])).pooler_output
            targets = torch.tensor([tokenizer.convert_tokens_to_ids(shapes.grid_text(s).split() + fillers)
                                    for s in scenes])  # (B, Q)
            distances = torch.cdist(tokens.flatten(0, 1), embeddings[words]) ** 2  # (B*Q, words)
            return ((tokens - embeddings[targets]) ** 2).sum(-1).mean() + nn.functional.cross_entropy(
                -distances / 0.05, torch.searchsorted(words, targets.flatten()))
        loss = minimise(parameters, steps, learning_rate, loss_at, "the queries on the cells' words", weight_decay=0.0)
        print(f"queries on the cells' words: final loss {loss:.3f}")
        return model, processor, loss
    return once(out, "query_words", steps, run)


def takes_route(family, steps) -> bool:
    """Whether `family`'s video stage comes after the BLIP-2-style route (`QUERY_WORD_FAMILIES`, `steps["words"]`)."""
    return family in QUERY_WORD_FAMILIES and bool(steps.get("words"))


def train_video(family, image_model, data, steps, work, num_frames: int = clips.NUM_FRAMES, bridge=None,
                name: str | None = None, batch_size: int = 32):
    """The video stage of `family` from its image model: `vlm-fusion train --model ... --num-frames` on clips and
    images (the second stage's settings; Flamingo-style: the `flamingo` stage, the LM frozen), the video path's
    fields `bridge` (pooling, the video Q-Former), in `work/<name>`; the trained model, its processor and the
    stage's summary. A family of `CLIP_TEXT_FAMILIES` first trains its LM `steps["clip_text"]` steps on the clips
    written as text (`clip_text_stage`; none if 0 or missing); one of `QUERY_WORD_FAMILIES`, given `steps["words"]`,
    the same and then its queries `steps["words"]` steps on the words; any family given `steps["rows"]` first trains
    its tower that many steps on the rows (`cell_rows_stage`; after the text stage, before the words)."""
    name = name or vlm_fusion.FAMILIES[family].name
    start = with_clip_words(image_model, os.path.join(work, name, "with_clip_words"))
    before = {}  # the stages before the video stage: name -> {"steps", "final_loss"}
    # the same for every video path of the family (the bridge's knobs come after): once a `work` folder
    route = takes_route(family, steps)
    stages = [("clip_text", clip_text_stage)] * (family in CLIP_TEXT_FAMILIES or route) + \
        [("rows", cell_rows_stage)] + [("words", query_words_stage)] * route
    folder = family
    for key, run in stages:
        if steps.get(key):
            folder += f"_{key}_{steps[key]}"
            before[key] = {"steps": steps[key], "final_loss": run(start, os.path.join(work, folder), steps[key])}
            start = os.path.join(work, folder)
    stage = question_stage(family)
    out = os.path.join(work, name, "video")
    # the image model's chat template, rendering a `{"type": "video"}` part as `<video>\n` too (as the data write it)
    summary = train_stage(TrainOptions(
        data=data, image_folder=os.path.join(work, "images"), output_dir=out, stage=stage, model=start,
        chat_template=chat_template(),
        num_frames=num_frames, bridge=bridge or {}, max_steps=steps["video"], batch_size=batch_size, seed=SEED,
        weight_decay=0.0, bridge_lr=STAGE2_LR, lm_lr=STAGE2_LR, warmup=max(1, steps["video"] // 20),
        logging_steps=max(1, steps["video"] // 5), save_steps=10**9, max_length=2048,
        train_output_embeddings=stage == "flamingo",  # its LM frozen: "up" and "down" are new words
        overwrite=True))  # a `work` folder keeps the stages before this one, not this one: it runs again
    summary["before"] = before
    return AutoModelForImageTextToText.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out), summary


# ---- 4. evaluation ---------------------------------------------------------------------------------------------
@torch.no_grad()
def exact_match(model, processor, data, kinds, prompt: str, media) -> dict:
    """Greedy exact-match accuracy per kind on `data`, `(image or frames, kind, question, answer)` each, 50 at a time
    left-padded (the processor's padding side is restored after); `media(items)`: the processor's image or video
    inputs for a chunk's items."""
    side, processor.tokenizer.padding_side = processor.tokenizer.padding_side, "left"
    correct, asked = dict.fromkeys(kinds, 0), dict.fromkeys(kinds, 0)
    try:
        for start in range(0, len(data), 50):
            chunk = data[start : start + 50]
            inputs = processor(**media([item for item, *_ in chunk]), padding=True, return_tensors="pt",
                               text=[prompt.format(question=q) for _, _, q, _ in chunk])
            out = model.generate(**inputs, max_new_tokens=shapes.MAX_ANSWER_TOKENS, do_sample=False)
            for (_, kind, _, answer), ids in zip(chunk, out[:, inputs["input_ids"].shape[1] :]):
                correct[kind] += processor.decode(ids, skip_special_tokens=True).strip() == answer
                asked[kind] += 1
    finally:
        processor.tokenizer.padding_side = side
    return {kind: correct[kind] / asked[kind] for kind in kinds}


def evaluate(model, processor, seed: int = 12345, per_kind: int = 200) -> dict:
    """Exact-match accuracy per question type on held-out scenes (greedy answers; for "left_of" the whole reasoning
    must match, not only its final yes/no)."""
    return exact_match(model, processor, shapes.examples(seed, per_kind * len(shapes.QUESTION_TYPES)),
                       shapes.QUESTION_TYPES, shapes.PROMPT, lambda images: {"images": images})


def evaluate_clips(model, processor, seed: int = 12345, per_kind: int = 200,
                   num_frames: int = clips.NUM_FRAMES) -> dict:
    """Exact-match accuracy per temporal question type on held-out clips of `num_frames` frames (greedy answers)."""
    return exact_match(model, processor, clips.examples(seed, per_kind * len(clips.TEMPORAL_TYPES),
                                                        num_frames=num_frames),
                       clips.TEMPORAL_TYPES, clips.PROMPT,
                       lambda videos: {"videos": [clips.as_array(frames) for frames in videos]})


def accuracy_table(results: dict) -> str:
    lines = ["| question type | accuracy |", "|---|---|"]
    lines += [f"| {kind} | {accuracy:.1%} |" for kind, accuracy in results.items()]
    return "\n".join(lines)


ORIGIN_VIDEO = (" Then the video stage: the clips' words added to its tokenizer{clip_text}, `vlm-fusion train "
                "--num-frames 8` added its video path and trained it ({stage} stage) on the clips of "
                "`vlm_fusion.demo.clips` and the image questions, mixed.")
# the origin's words for each stage before the video stage, in their order
ORIGIN_BEFORE_VIDEO = {"clip_text": "its LM trained on the clips written as text",
                       "rows": "its tower taught the cells' rows",
                       "words": "its Q-Former taught to write each frame as those words"}


def image_training(image_model: str, summary: dict | None, out: str) -> str:
    """The card's section on the image stage: from its summary, or (`--video-from`) the image model's own card, its
    loss curve beside the new card."""
    if summary is not None:
        section = training_section(summary)
        curve = summary.get("loss_curve") and os.path.join(summary["output_dir"], summary["loss_curve"])
    else:
        with open(os.path.join(image_model, "README.md"), encoding="utf-8") as f:
            card = f.read()
        section = "## Training" + card.split("## Training", 1)[1].split("\n## ", 1)[0]
        curve = os.path.join(image_model, "loss.png")
    if curve and os.path.isfile(curve):  # the card shows each stage's loss curve: it ships beside the card
        shutil.copy(curve, os.path.join(out, "loss.png"))
        section = section.replace(f"({os.path.basename(curve)})", "(loss.png)")
    return section


# the card's words for each stage before the video stage (`train_video`'s summary["before"])
BEFORE_VIDEO = {
    "clip_text": "the LM trained {steps:,} steps of 64 on the clips written as text (each frame's grid words, frame "
                 "after frame) and the image questions as text, in turn (`vlm_fusion.demo.train.clip_text_stage`)",
    "rows": "the tower trained {steps:,} steps of 64 to name each patch's row besides its cell's shape, colour and "
            "column (`vlm_fusion.demo.train.cell_rows_stage`)",
    "words": "the Q-Former and projection trained {steps:,} steps of 64 to write each image as the LM reads it "
             "written as text (`vlm_fusion.demo.train.query_words_stage`)",
}


def video_training(summary: dict, out: str) -> str:
    section = training_section(summary).replace("## Training", "## Training: the video stage", 1)
    if summary["before"]:
        section += "\nBefore it, " + "; then ".join(
            BEFORE_VIDEO[key].format(steps=stage["steps"]) + f", final loss {stage['final_loss']:.3f}"
            for key, stage in summary["before"].items()) + ".\n"
    if summary.get("loss_curve"):
        shutil.copy(os.path.join(summary["output_dir"], summary["loss_curve"]), os.path.join(out, "loss_video.png"))
        section = section.replace(f"({summary['loss_curve']})", "(loss_video.png)")
    return section


def evaluation_section(image_before: dict, image_after: dict, video: dict, per_kind: int) -> str:
    """The card's evaluation: the clips' accuracy, and the images' before and after the video stage."""
    images = ["| question type | image model | this model |", "|---|---|---|"]
    images += [f"| {kind} | {image_before[kind]:.1%} | {image_after[kind]:.1%} |" for kind in image_after]
    return (f"## Evaluation\n\nHeld-out synthetic clips (seed 12345, {per_kind} questions per type, 8 frames), greedy "
            "exact match, measured by `vlm_fusion.demo.train.evaluate_clips`:\n\n"
            f"{accuracy_table(video)}\n\nHeld-out synthetic scenes (seed 12345, {per_kind} questions per type), greedy "
            "exact match of the whole answer (for left_of, its reasoning too), measured by "
            "`vlm_fusion.demo.train.evaluate`, for the image model the video stage started from and for this "
            "model:\n\n" + "\n".join(images) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "checkpoints"))
    parser.add_argument("--families", nargs="+", default=list(FAMILY_CONFIG), choices=list(FAMILY_CONFIG))
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps (a smoke run; poor accuracy)")
    parser.add_argument("--ablation", action="store_true", help="also train the BLIP-2-style model without stage 1 "
                        "(BLIP-2's ablation) and print its accuracy beside the shipped one's")
    parser.add_argument("--parts", help="a folder for the pretrained parts (`vision/`, `lm/`): each one there is "
                        "used as it is, each one missing is pretrained and saved there (to train families one run at "
                        "a time on the same parts)")
    parser.add_argument("--video-from", metavar="DIR", help="start the video stage from the image models in DIR "
                        "(`llava/`, `blip2/`, `flamingo/`, as this script saves them) instead of training them")
    parser.add_argument("--work", metavar="DIR", help="keep the intermediate models and data in DIR (default: a "
                        "temporary folder); the stages before the video stage already run there are not run again")
    parser.add_argument("--query-words", action=argparse.BooleanOptionalAction, default=True,
                        help="the BLIP-2-style model's route to time before its video stage (its LM on the clips as "
                        "text, its tower on rows, its queries on the cells' words), then a video stage of "
                        f"{QUERY_WORDS_STEPS['video']} steps; --no-query-words: the video stage alone, "
                        f"{STEPS['video']} steps, as the other families")
    args = parser.parse_args(argv)
    steps = family_steps(quick=args.quick)  # those of the stages before the video stage
    per_kind = 20 if args.quick else 200  # held-out questions per type
    # the cores this process may run on (`taskset`, a container's limit), not the machine's
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    results = {}
    if args.work:
        os.makedirs(args.work, exist_ok=True)
    with contextlib.nullcontext(args.work) if args.work else tempfile.TemporaryDirectory() as work:
        if not args.video_from:
            vision, language = pretrained_parts(args.parts or work, steps)
            data = task_data(work, steps, args.families)
        for family in args.families:
            name = vlm_fusion.FAMILIES[family].name
            if args.video_from:
                image_model, image_summary = os.path.join(args.video_from, name), None
                image = AutoModelForImageTextToText.from_pretrained(image_model).eval()
                image_processor = AutoProcessor.from_pretrained(image_model)
            else:
                stage1 = None
                if family == "fusion_blip2":
                    stage1 = train_qformer(vision, data, steps, work)
                    results["retrieval"] = evaluate_retrieval(stage1, work)
                    print("stage-1 Q-Former, held-out retrieval: " + ", ".join(
                        f"{k} {v:.1f}" for k, v in results["retrieval"].items()))
                    if args.ablation:
                        model, processor, _ = train_family(family, vision, language, data, steps, work)
                        results["fusion_blip2_without_stage1"] = evaluate(model, processor, per_kind=per_kind)
                        ablation = accuracy_table(results["fusion_blip2_without_stage1"])
                        print(f"fusion_blip2 without stage 1:\n{ablation}")
                image, image_processor, image_summary = train_family(family, vision, language, data, steps, work,
                                                                     stage1)
                image_model = image_summary["output_dir"]
            before = evaluate(image, image_processor, per_kind=per_kind)
            video_steps = family_steps(family, args.query_words, args.quick)
            model, processor, summary = train_video(family, image_model, video_data(work, video_steps), video_steps,
                                                    work)
            results[family] = {"images_before": before, "images": evaluate(model, processor, per_kind=per_kind),
                               "clips": evaluate_clips(model, processor, per_kind=per_kind)}
            path = os.path.join(args.out, name)
            if os.path.realpath(path) == os.path.realpath(image_model):
                raise SystemExit(f"--out {args.out} would overwrite the image model the video stage starts from")
            before_video = summary["before"]
            clip_text = "".join(f", {words}" for key, words in ORIGIN_BEFORE_VIDEO.items() if key in before_video)
            head = ", its LM's output embeddings too" if summary["options"].get("train_output_embeddings") else ""
            stage = summary["stage"] + head
            model.config.origin = model.config.origin.rstrip() + ORIGIN_VIDEO.format(stage=stage, clip_text=clip_text)
            shutil.rmtree(path, ignore_errors=True)
            model.save_pretrained(path)
            processor.save_pretrained(path)
            sections = [image_training(image_model, image_summary, path), video_training(summary, path)]
            evaluation = evaluation_section(before, results[family]["images"], results[family]["clips"], per_kind)
            write_model_card(model, path, repo_id=family, extra="\n".join(sections) + "\n" + evaluation,
                             usage=card_usage(name))
            print(f"{family}, clips:\n{accuracy_table(results[family]['clips'])}\n"
                  f"{family}, images (before the video stage / after):\n" + "\n".join(
                      f"  {kind}: {before[kind]:.1%} / {acc:.1%}" for kind, acc in results[family]["images"].items()))
    minutes = (time.perf_counter() - start) / 60
    print(f"trained {len(args.families)} families in {minutes:.1f} min")
    return results


if __name__ == "__main__":
    main()
