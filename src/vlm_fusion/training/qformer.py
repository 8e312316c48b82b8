"""BLIP-2's stage 1 (`vlm-fusion train --stage qformer`): the Q-Former learns to read images for text with ITC, ITM
and ITG on image-caption pairs, the vision tower frozen, no LM loaded.

    image-caption pairs (the `align` formats)  ->  tower (frozen) + Q-Former from BERT or from scratch  ->
    transformers' Trainer on the three losses (negatives drawn over the global batch)  ->  a stage-1 checkpoint

The checkpoint is a [`FusionBlip2ForImageTextRetrieval`]: it retrieves and classifies zero-shot as it is, and
`vlm-fusion train --stage align --model IT --language-model LM` starts BLIP-2's generative stage from it.

Legend: B pairs in a batch, T longest caption (at most `max_text_length`).
"""

import collections

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer
from transformers.utils import logging

from vlm_fusion import FusionBlip2ForImageTextRetrieval, FusionBlip2QFormerConfig, FusionBlip2QFormerProcessor
from vlm_fusion.modeling_qformer import qformer_from_bert
from vlm_fusion.vision import load_vision_tower

from .data import CaptionPair, DataError, caption_pairs, image_size, load, open_image
from .distributed import is_main_process
from .models import model_to_train
from .options import TrainOptions
from .runner import Run, part_learning_rates, prepare_output
from .stages import STAGES
from .streaming import StreamCollator, check_streamed_options, image_number, open_stream, run_length, stream_dataset, \
    wanted
from .trainer import FusionTrainer, StreamReading

logger = logging.get_logger("vlm_fusion.training")

# BERT's config -> the Q-Former's fields (BLIP-2's Q-Former is bert-base-uncased plus cross-attention).
BERT_FIELDS = {"hidden_size": "qformer_hidden_size", "num_hidden_layers": "qformer_num_hidden_layers",
               "num_attention_heads": "qformer_num_attention_heads", "intermediate_size": "qformer_intermediate_size",
               "layer_norm_eps": "qformer_layer_norm_eps", "max_position_embeddings": "qformer_max_position_embeddings",
               "hidden_dropout_prob": "qformer_dropout"}


class CaptionDataset(torch.utils.data.Dataset):
    """Image-caption pairs; an item's image is read and processed when it is asked for. `image_id` numbers the
    distinct images, so that two captions of one image are both positives."""

    def __init__(self, processor, pairs: list[CaptionPair]):
        self.processor, self.pairs = processor, pairs
        ids = {}
        self.image_ids = [ids.setdefault(image_key(pair.image), len(ids)) for pair in pairs]

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index) -> dict:
        pair = self.pairs[index]
        pixel_values = self.processor(images=[open_image(pair.image)], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values[0], "caption": pair.caption, "image_id": self.image_ids[index]}


def image_key(image):
    return image if isinstance(image, str) else id(image)


class CaptionCollator:
    """Stacks the images and tokenizes the captions (cut at `max_text_length`, padded to the longest)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, items: list[dict]) -> dict:
        text = self.processor(text=[item["caption"] for item in items], return_tensors="pt")
        return {"pixel_values": torch.stack([item["pixel_values"] for item in items]),  # (B, C, H, W)
                "input_ids": text["input_ids"], "attention_mask": text["attention_mask"],  # (B, T)
                "image_ids": torch.tensor([item["image_id"] for item in items])}  # (B,)


class CaptionItems:
    """BLIP-2 stage 1's item, as `CaptionDataset` makes it; `image_id` is the sample's key as a number."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, key: str, image: Image.Image, caption: str) -> dict:
        pixel_values = self.processor(images=[image], return_tensors="pt")["pixel_values"]  # (1, C, H, W)
        return {"pixel_values": pixel_values[0], "caption": caption, "image_id": image_number(key)}


def read_pairs(options) -> tuple[str, list[CaptionPair]]:
    """Every pair read and its image checked before anything is loaded: a bad one is one line naming it."""
    conversations, name = load(options.data, options.image_folder)
    pairs = caption_pairs(conversations)
    if len(pairs) < 2:
        raise DataError(f"{options.data} holds {len(pairs)} image-caption pair(s): ITC contrasts each image with "
                        "the other captions, so stage 1 needs at least 2")
    for pair in tqdm(pairs, desc="checking the images", disable=not is_main_process()):
        image_size(pair.image, pair.id)
    return name, pairs


def load_qformer_model(options: TrainOptions):
    """A stage-1 checkpoint to continue (`--model`), or a new model from `--vision-tower` and a Q-Former started from
    BERT (`--qformer-init`) or from scratch at the `--bridge` sizes (with `--qformer-tokenizer`)."""
    if options.family not in (None, "blip2"):
        raise DataError(f"--stage qformer trains BLIP-2's Q-Former: --family must be blip2, not {options.family}")
    if options.language_model:
        raise DataError("--stage qformer loads no language model (BLIP-2's stage 1 has none): drop "
                        "--language-model, and give it to the next stage (--stage align --model THIS_OUTPUT "
                        "--language-model LM)")
    if options.model:
        if options.vision_tower or options.qformer_init:
            raise DataError("give either --model (a stage-1 checkpoint) or --vision-tower and --qformer-init, "
                            "not both")
        model = AutoModel.from_pretrained(options.model)
        if not isinstance(model, FusionBlip2ForImageTextRetrieval):
            raise DataError(f"{options.model} holds a {type(model).__name__}; --stage qformer continues a "
                            "stage-1 checkpoint (FusionBlip2ForImageTextRetrieval)")
        return model, AutoProcessor.from_pretrained(options.model)
    if not options.vision_tower:
        raise DataError("start from --model DIR (a stage-1 checkpoint), or from --vision-tower DIR with "
                        "--qformer-init BERT_DIR (or --qformer-tokenizer DIR for a Q-Former from scratch)")
    tokenizer_path = options.qformer_tokenizer or options.qformer_init
    if not tokenizer_path:
        raise DataError("the Q-Former reads captions with a tokenizer of its own: pass --qformer-init BERT_DIR "
                        "(BLIP-2 starts from bert-base-uncased) or --qformer-tokenizer DIR")
    processor = FusionBlip2QFormerProcessor(
        image_processor=AutoImageProcessor.from_pretrained(options.vision_tower),
        tokenizer=AutoTokenizer.from_pretrained(tokenizer_path),
        max_text_length=options.bridge.get("max_text_length", 32))
    fields = {}
    if options.qformer_init:
        bert = AutoConfig.from_pretrained(options.qformer_init)
        if bert.model_type != "bert" or bert.hidden_act != "gelu":
            raise DataError(f"--qformer-init {options.qformer_init} holds a {bert.model_type} "
                            f"({bert.hidden_act}), not a BERT with GELU")
        fields = {ours: getattr(bert, theirs) for theirs, ours in BERT_FIELDS.items()}
    tokenizer = processor.tokenizer
    tower = load_vision_tower(options.vision_tower)
    config = FusionBlip2QFormerConfig(
        vision_config=tower.config, qformer_vocab_size=len(tokenizer), qformer_bos_token_id=processor.bos_token_id,
        qformer_pad_token_id=tokenizer.pad_token_id or 0,
        origin=f"BLIP-2 stage 1 on the vision tower `{options.vision_tower}`, the Q-Former from "
               + (f"the BERT checkpoint `{options.qformer_init}`" if options.qformer_init else "scratch") + ".",
        **{**fields, **options.bridge})
    model = FusionBlip2ForImageTextRetrieval(config, vision_tower=tower)
    if options.qformer_init:
        report = qformer_from_bert(model, options.qformer_init)
        logger.warning("Q-Former from %s: %d tensors from BERT (the query FFNs copies of the text FFNs), %d new",
                       options.qformer_init, report["from_bert"], report["new"])
    return model, processor


def negatives_seed(seed: int, step: int, micro_step: int) -> int:
    """The seed of one micro-batch's ITM draws: the same in every process and after a resume."""
    return (seed * 1_000_003 + step * 1_009 + micro_step) % (2 ** 63)


class QFormerTrainer(FusionTrainer):
    """`FusionTrainer` on the stage-1 losses: each micro-batch draws its ITM negatives with its own seed, and the
    logs show ITC, ITM and ITG beside the total."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._micro_step, self._parts = 0, collections.defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        generator = torch.Generator().manual_seed(negatives_seed(self.args.seed, self.state.global_step,
                                                                 self._micro_step))
        self._micro_step = (self._micro_step + 1) % self.args.gradient_accumulation_steps
        outputs = model(**inputs, return_loss=True, negatives_generator=generator)
        for name in ("loss_itc", "loss_itm", "loss_itg"):
            self._parts[name].append(float(outputs[name]))
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._parts:  # the mean since the last log, over every process (as `loss`)
            means = torch.tensor([sum(v) / len(v) for v in self._parts.values()], dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(means)
                means /= torch.distributed.get_world_size()
            logs.update({name: round(float(mean), 4) for name, mean in zip(self._parts, means)})
            self._parts.clear()
        super().log(logs, start_time)


class StreamingQFormerTrainer(StreamReading, QFormerTrainer):
    """`QFormerTrainer` on streamed image-caption pairs."""


def qformer_run(options: TrainOptions) -> Run:
    """Stage 1 on `--data`'s image-caption pairs (JSON / TRL, read whole) or on pairs streamed from shards."""
    stage = STAGES["qformer"]
    for flag, value in (("--lora", options.lora), ("--qlora", options.qlora)):
        if value:
            raise DataError(f"{flag} adapts the LM, which --stage qformer does not load")
    resume_from = prepare_output(options)
    part_lrs = {**part_learning_rates(options, stage), "language_model": 0.0}  # no LM
    if wanted(options):  # image-caption pairs streamed from shards or a `datasets` dataset
        check_streamed_options(options)
        stream = open_stream(options)
        options = run_length(options, stream)
        model, processor, trainable = model_to_train(options, stage, load=load_qformer_model)
        return Run(options, stage, stage.layout, model, processor, trainable, part_lrs,
                   dataset=stream_dataset(options, stream, CaptionItems(processor), resume_from),
                   collator=StreamCollator(CaptionCollator(processor)),
                   summary={"data": stream.name, "samples": 0, "samples_skipped": 0},
                   arguments=dict(ignore_data_skip=True), resume_from=resume_from,
                   trainer_class=StreamingQFormerTrainer)
    name, pairs = read_pairs(options)
    model, processor, trainable = model_to_train(options, stage, load=load_qformer_model)
    truncated = processor.truncated([pair.caption for pair in pairs])
    if truncated:
        logger.warning("%d of %d captions are longer than %d Q-Former tokens and are cut there (as LAVIS cuts them)",
                       truncated, len(pairs), processor.max_text_length)
    return Run(options, stage, stage.layout, model, processor, trainable, part_lrs,
               dataset=CaptionDataset(processor, pairs), collator=CaptionCollator(processor),
               summary={"data": name, "samples": len(pairs), "samples_skipped": 0, "captions_truncated": truncated},
               resume_from=resume_from, trainer_class=QFormerTrainer)
