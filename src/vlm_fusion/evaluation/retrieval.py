"""Image-text retrieval of a stage-1 BLIP-2 Q-Former, by LAVIS's procedure (LAVIS 1.0.2: `compute_sim_matrix` in
`lavis/models/blip2_models/blip2.py`, `_report_metrics` in `lavis/tasks/retrieval.py`):

    1. ITC   every image-caption pair's similarity: the best of the image's query embeddings against the caption's.
    2. ITM   each image's top k captions by ITC are scored again as ITM "match" logit + ITC similarity, every other
             caption gets -100; the same for each caption's top k images (k capped at the number of candidates).
    3. R@n   image -> text (`txt_r*`): an image's rank is the best rank among its captions; text -> image (`img_r*`):
             a caption's rank is its image's. Ranks are positions in `np.argsort(scores)[::-1]` (see `ranks`).

Computing apart from running: `itc_similarity`, `rerank`, `ranks` and `retrieval_metrics` are functions of arrays;
`score_matrices` runs a model to feed them; `read_samples` turns training data into images and captions.

The model contract (what `FusionBlip2ForImageTextRetrieval` answers; `load` checks the checkpoint's type):

    processor(images=[PIL, ...], return_tensors="pt") -> {"pixel_values"}
    processor(text=[str, ...], return_tensors="pt")   -> {"input_ids", "attention_mask"}  (padded to the longest)
    model.get_vision_embeddings(pixel_values=...)      -> (N, V, D_v)   what the Q-Former attends to
    model.get_image_features(vision_embeds=...)        -> (N, Q, E)     L2-normalised, one embedding per query
    model.get_text_features(input_ids=..., attention_mask=...)                     -> (M, E)  L2-normalised
    model.image_text_matching(vision_embeds=..., input_ids=..., attention_mask=...) -> (P, 2)  column 1 = "match"

Shapes: N images, M captions, Q query tokens, E the shared embedding width, V vision positions, D_v the vision
width, L caption tokens, R x C a score matrix (a row per query item, a column per candidate), K candidates kept per
row, P image-caption pairs, G the relevant candidates of one row.
"""

import functools
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from vlm_fusion.training import data
from vlm_fusion.training.data import DataError

MODEL_TYPE = "fusion_blip2_qformer"  # the stage-1 checkpoint: FusionBlip2ForImageTextRetrieval
MISSING = -100.0  # LAVIS's score for a candidate outside the top k
RECALLS = (1, 5, 10)


# ---- the arithmetic: arrays in, arrays out ---------------------------------------------------------------------
def itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor, *, chunk: int = 16) -> torch.Tensor:
    """ITC similarity of every image with every caption: the best of the image's query embeddings.

    Args:
        image_feats: `(num_images, num_query_tokens, embed_dim)`.
        text_feats: `(num_texts, embed_dim)`.
    Returns:
        `(num_images, num_texts)`; `chunk` images at a time, so that `(chunk, Q, M)` is all that is held at once.
    """
    return torch.cat([torch.einsum("nqe,me->nqm", block, text_feats).amax(dim=1)  # (n, Q, M) -> (n, M)
                      for block in image_feats.split(chunk)])  # (N, M)


def rerank(sims: torch.Tensor, k: int, itm, *, batch_size: int, progress=None) -> torch.Tensor:
    """LAVIS's re-ranking, one direction: each row's top `k` columns by ITC (`k` capped at the number of columns)
    are scored ITM match logit + ITC similarity; every other column gets -100.

    Args:
        sims: `(rows, columns)` ITC similarities (images x captions, or captions x images).
        itm: `itm(rows, columns) -> (pairs,)`, the ITM match logits of the pairs `(rows[p], columns[p])`; called
            on at most `batch_size` pairs at a time, row after row.
        progress: wraps the iterable of batches (e.g. `tqdm`); none by default.
    Returns:
        `(rows, columns)` float32 scores.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    R, C = sims.shape
    K = min(k, C)
    top_sims, top_columns = sims.float().topk(K, dim=1)  # (R, K) each
    rows = torch.arange(R).repeat_interleave(K)  # (R*K,) the row of each pair
    columns = top_columns.reshape(-1)  # (R*K,)
    starts = range(0, R * K, batch_size)
    logits = torch.cat([itm(rows[s:s + batch_size], columns[s:s + batch_size]).float().cpu()  # (P,)
                        for s in (progress(starts) if progress else starts)])  # (R*K,)
    scores = torch.full((R, C), MISSING)
    return scores.scatter_(1, top_columns, top_sims + logits.view(R, K))  # (R, C)


def ranks(scores, relevant: list) -> np.ndarray:
    """Each row's best rank (0 = first) among its `relevant` columns, in LAVIS's order `np.argsort(row)[::-1]`.

    Ties: LAVIS leaves equal scores in whatever order numpy's default sort gives, which is the implementation's
    (numpy's introsort is stable below 16 elements; its SIMD sorts are not). Here the order is fixed as a stable sort's
    reversed: among equal scores the later column ranks first. That is counted, not sorted: a column's rank is the
    number of columns scoring higher plus the number of later columns scoring the same.

    Args:
        scores: `(rows, columns)`.
        relevant: for each row, the indices of its relevant columns (at least one).
    Returns:
        `(rows,)` int64.
    """
    scores = np.asarray(scores)
    later = np.arange(scores.shape[1])  # (C,)
    best = np.empty(len(scores), dtype=np.int64)
    for r, (row, columns) in enumerate(zip(scores, relevant)):
        columns = np.asarray(columns)[:, None]  # (G, 1)
        mine = row[columns]  # (G, 1)
        ahead = (row > mine).sum(1) + ((row == mine) & (later > columns)).sum(1)  # (G, C) -> (G,)
        best[r] = ahead.min()
    return best


def recall(ranks: np.ndarray, n: int) -> float:
    """R@n in percent as LAVIS's `_report_metrics` writes it: `100.0 * len(np.where(ranks < n)[0]) / len(ranks)`."""
    return 100.0 * int(np.count_nonzero(ranks < n)) / len(ranks)


def retrieval_metrics(scores_i2t, scores_t2i, txt2img) -> dict[str, float]:
    """R@1/5/10 both ways and their means, under LAVIS's key names.

    Args:
        scores_i2t: `(num_images, num_texts)`, a row per image.
        scores_t2i: `(num_texts, num_images)`, a row per caption.
        txt2img: `(num_texts,)`, the image of each caption; every image has at least one.
    Returns:
        `txt_r1/5/10` (image -> text), `img_r1/5/10` (text -> image), in percent; `txt_r_mean`, `img_r_mean`,
        `r_mean` (their mean) and `agg_metrics`, which LAVIS sets to `txt_r_mean`.
    """
    txt2img = np.asarray(txt2img)
    (N, M), (M_t2i, N_t2i) = np.shape(scores_i2t), np.shape(scores_t2i)
    if (M_t2i, N_t2i) != (M, N) or len(txt2img) != M:
        raise ValueError(f"scores_i2t is {N}x{M}, scores_t2i {M_t2i}x{N_t2i}, and txt2img holds {len(txt2img)} "
                         f"captions: expected {N}x{M}, {M}x{N} and {M}")
    img2txt = [[] for _ in range(N)]
    for text, image in enumerate(txt2img):
        img2txt[image].append(text)
    if not all(img2txt):
        raise ValueError(f"images without a caption: {[i for i, texts in enumerate(img2txt) if not texts]}")
    text_ranks = ranks(scores_i2t, img2txt)  # (N,)
    image_ranks = ranks(scores_t2i, txt2img[:, None])  # (M,)
    # LAVIS's arithmetic to the last bit (a JSON compared with LAVIS's by equality): 100 * count / total, not
    # 100 * mean (1 in 7: 14.285714285714286, not ...285), and the means summed left to right, then divided
    tr1, tr5, tr10 = (recall(text_ranks, n) for n in RECALLS)
    ir1, ir5, ir10 = (recall(image_ranks, n) for n in RECALLS)
    tr_mean, ir_mean = (tr1 + tr5 + tr10) / 3, (ir1 + ir5 + ir10) / 3
    metrics = {"txt_r1": tr1, "txt_r5": tr5, "txt_r10": tr10, "txt_r_mean": tr_mean,
               "img_r1": ir1, "img_r5": ir5, "img_r10": ir10, "img_r_mean": ir_mean,
               "r_mean": (tr_mean + ir_mean) / 2,
               "agg_metrics": (tr1 + tr5 + tr10) / 3}  # LAVIS's agg_metrics: the image -> text mean
    return metrics


def report(metrics: dict, *, images: int, texts: int, k: int) -> str:
    """The metrics as the command prints them."""
    def line(name, prefix):
        recalls = "   ".join(f"R@{n} {metrics[f'{prefix}_r{n}']:6.2f}" for n in RECALLS)
        return f"  {name}  {recalls}   mean {metrics[f'{prefix}_r_mean']:6.2f}"

    return "\n".join([
        f"{images:,} images, {texts:,} captions; ITM re-ranked each image's top {min(k, texts)} captions and each "
        f"caption's top {min(k, images)} images by ITC",
        line("image -> text (txt_r)", "txt"),
        line("text -> image (img_r)", "img"),
        f"  r_mean {metrics['r_mean']:.2f}   agg_metrics {metrics['agg_metrics']:.2f} (LAVIS's: txt_r_mean)",
    ])


# ---- the data: images and their captions -----------------------------------------------------------------------
@dataclass
class RetrievalSet:
    images: list  # N paths or PIL images, each image once
    texts: list[str]  # M captions
    txt2img: list[int]  # M: the image of each caption (LAVIS's txt2img; its img2txt is the inverse)


def read_samples(path: str, image_folder: str | None = None) -> RetrievalSet:
    """The images and captions of a file or dataset `vlm_fusion.training.data.load` reads, checked."""
    conversations, name = data.load(path, image_folder)
    return retrieval_set(conversations, name)


def retrieval_set(conversations: list, name: str = "the data") -> RetrievalSet:
    """A sample is one image and its caption (`data.caption_pairs`: the assistant text, `<image>` markers and the
    whitespace around it stripped). An image in several samples (the same path) is one image with several captions."""
    images, texts, txt2img, index = [], [], [], {}
    for pair in data.caption_pairs(conversations):
        key = image_key(pair.image)
        if key not in index:
            data.image_size(pair.image, pair.id)  # the file is there and readable: DataError naming the sample if not
            index[key] = len(images)
            images.append(pair.image)
        texts.append(pair.caption)
        txt2img.append(index[key])
    if len(images) < 2:
        raise DataError(f"{name} holds {len(images)} distinct image(s) ({len(texts)} caption(s)); retrieval ranks "
                        "at least 2 images")
    return RetrievalSet(images, texts, txt2img)


def image_key(image) -> str:
    """What makes two samples' images the same image: the file's path, or a decoded image's pixels."""
    if isinstance(image, str):
        return os.path.normpath(os.path.abspath(image))
    digest = hashlib.sha1(image.tobytes()).hexdigest()
    return f"pixels:{image.mode}:{image.size}:{digest}"


# ---- the model -------------------------------------------------------------------------------------------------
def check_model_type(path: str) -> None:
    """Refuse, in one line, a checkpoint that is not a stage-1 Q-Former, before anything heavy is loaded."""
    from transformers import PretrainedConfig

    from vlm_fusion import FAMILIES

    try:
        config, _ = PretrainedConfig.get_config_dict(path)
    except Exception as error:  # no folder, no config.json, not JSON, not on the Hub: one line
        lines = str(error).strip().splitlines()
        raise DataError(f"cannot load a model from {path}: {lines[0] if lines else type(error).__name__}") from None
    model_type = config.get("model_type")
    if model_type == MODEL_TYPE:
        return
    if model_type in FAMILIES:
        raise DataError(f"{path} is a generation model ({model_type}); retrieval needs a stage-1 Q-Former "
                        f"checkpoint ({MODEL_TYPE})")
    raise DataError(f"{path} is a {model_type or 'model without a model_type'} checkpoint; retrieval needs a stage-1 "
                    f"Q-Former checkpoint ({MODEL_TYPE})")


def load(path: str):
    """The stage-1 model (in eval mode, on the GPU when there is one) and its processor."""
    from transformers import AutoModel, AutoProcessor

    import vlm_fusion  # noqa: F401  (registers the families)

    check_model_type(path)
    model = AutoModel.from_pretrained(path).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    return model, AutoProcessor.from_pretrained(path)


@torch.no_grad()
def encode_images(model, processor, images: list, *, batch_size: int, progress=None):
    """`(N, V, D_v)` vision embeddings (kept on the CPU, as LAVIS keeps them) and `(N, Q, E)` image features."""
    parameter = next(model.parameters())
    vision, features = [], []
    starts = range(0, len(images), batch_size)
    for start in progress(starts) if progress else starts:
        batch = [data.open_image(image) for image in images[start:start + batch_size]]
        pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"]
        embeds = model.get_vision_embeddings(pixel_values=pixel_values.to(parameter.device, parameter.dtype))
        features.append(model.get_image_features(vision_embeds=embeds).float().cpu())  # (B, Q, E)
        vision.append(embeds.cpu())  # (B, V, D_v)
    return torch.cat(vision), torch.cat(features)  # (N, V, D_v), (N, Q, E)


@torch.no_grad()
def encode_texts(model, processor, texts: list[str], *, batch_size: int, progress=None):
    """The captions' `(M, L)` token ids and attention mask (on the CPU), and their `(M, E)` features."""
    device = next(model.parameters()).device
    tokens = processor(text=texts, return_tensors="pt")  # one call: one padded length for every caption
    input_ids, attention_mask = tokens["input_ids"], tokens["attention_mask"]  # (M, L) each
    starts = range(0, len(texts), batch_size)
    features = [model.get_text_features(input_ids=input_ids[s:s + batch_size].to(device),
                                        attention_mask=attention_mask[s:s + batch_size].to(device)).float().cpu()
                for s in (progress(starts) if progress else starts)]  # (B, E) each
    return input_ids, attention_mask, torch.cat(features)  # (M, L), (M, L), (M, E)


@torch.no_grad()
def score_matrices(model, processor, samples: RetrievalSet, *, k: int = 128, batch_size: int = 32, progress=None):
    """`(N, M)` image -> text and `(M, N)` text -> image scores: ITC, then ITM + ITC for each row's top `k`.

    `progress(iterable, desc=..., unit=...)` wraps each loop of batches (e.g. `tqdm`); none by default."""
    def bar(desc):
        return functools.partial(progress, desc=desc, unit="batch") if progress else None

    device = next(model.parameters()).device
    vision_embeds, image_feats = encode_images(model, processor, samples.images, batch_size=batch_size,
                                               progress=bar("images"))
    input_ids, attention_mask, text_feats = encode_texts(model, processor, samples.texts, batch_size=batch_size,
                                                         progress=bar("captions"))
    sims = itc_similarity(image_feats, text_feats)  # (N, M)

    def itm(images, texts):  # (P,), (P,) -> (P,) the "match" logits of the pairs
        logits = model.image_text_matching(vision_embeds=vision_embeds[images].to(device),  # (P, V, D_v)
                                           input_ids=input_ids[texts].to(device),  # (P, L)
                                           attention_mask=attention_mask[texts].to(device))  # (P, 2)
        return logits[:, 1]

    scores_i2t = rerank(sims, k, itm, batch_size=batch_size, progress=bar("ITM image -> text"))  # (N, M)
    scores_t2i = rerank(sims.T, k, lambda texts, images: itm(images, texts), batch_size=batch_size,
                        progress=bar("ITM text -> image"))  # (M, N)
    return scores_i2t, scores_t2i


def evaluate(model, processor, samples: RetrievalSet, *, k: int = 128, batch_size: int = 32, progress=None) -> dict:
    """LAVIS's retrieval metrics of `model` on `samples` (see `retrieval_metrics`)."""
    scores_i2t, scores_t2i = score_matrices(model, processor, samples, k=k, batch_size=batch_size, progress=progress)
    return retrieval_metrics(scores_i2t.numpy(), scores_t2i.numpy(), samples.txt2img)
