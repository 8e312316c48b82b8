"""LAVIS's own BLIP-2 stage-1 model (`Blip2Qformer`: ITC + ITM + ITG losses) as a reference for our tests.

LAVIS (`salesforce-lavis` on PyPI) does not install here (it pins transformers<4.27, timm==0.4.12, opencv, spaCy...),
and this project ships none of its code. Its files are read from the wheel of LAVIS `LAVIS_VERSION`, found (first
match wins)

1. in `$VLM_FUSION_LAVIS_WHEEL`: the path of a downloaded `salesforce_lavis-1.0.2-py3-none-any.whl`;
2. in the cache, `$VLM_FUSION_TEST_CACHE` (default `~/.cache/vlm-fusion`)`/lavis-1.0.2/`;
3. otherwise downloaded with `pip download --no-deps --only-binary :all: salesforce-lavis==1.0.2` into a temporary
   folder; only the files in `FILES` are extracted into the cache, the wheel is deleted afterwards.

When none of this can be had (no network, no pip), `lavis_modules()` skips the calling test with the reason.

Only the files that hold the BLIP-2 stage-1 math are imported from the wheel: `Qformer.py` (LAVIS's BERT with query
tokens, cross-attention every `cross_attention_freq` layers and separate query FFNs), `blip2.py` (`Blip2Base`,
`LayerNorm`), `blip2_qformer.py` (`Blip2Qformer.forward`: the three losses) and `blip_outputs.py` (`BlipOutput`).
Everything else they import is a stand-in, registered in `sys.modules` under LAVIS's module names (`lavis.*`):
the registry (identity decorator), `dist_utils` and `base_model` (one process: rank 0, world size 1, the gathers
return their argument), `utils`/`logger` and the two ViT factories (never called: we feed patch features). No
third-party module is stubbed. transformers 5 lacks names `Qformer.py` was written against (transformers 4.25-4.26):
they are supplied without touching LAVIS's math, see `_transformers_4_names()` and `_patch_qformer()`.
"""

import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from unittest import mock

import pytest
import torch
from torch import nn

LAVIS_VERSION = "1.0.2"
WHEEL_ENV = "VLM_FUSION_LAVIS_WHEEL"
# the files imported from the wheel, in import order (each imports only stand-ins and the ones before it)
FILES = (
    "lavis/models/blip_models/blip_outputs.py",
    "lavis/models/blip2_models/Qformer.py",
    "lavis/models/blip2_models/blip2.py",
    "lavis/models/blip2_models/blip2_qformer.py",
)
_PACKAGES = ("lavis", "lavis.common", "lavis.models", "lavis.models.blip_models", "lavis.models.blip2_models")

_loaded: types.SimpleNamespace | None = None
_unavailable_reason: str | None = None


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("VLM_FUSION_TEST_CACHE") or pathlib.Path.home() / ".cache" / "vlm-fusion")


def _extract(wheel: pathlib.Path, target: pathlib.Path) -> None:
    """Copy `FILES` out of `wheel` into `target` (created atomically: a half-extracted folder is never taken)."""
    staging = pathlib.Path(tempfile.mkdtemp(dir=target.parent))
    with zipfile.ZipFile(wheel) as archive:
        for name in FILES:
            destination = staging / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(archive.read(name))
    try:
        staging.rename(target)
    except OSError:  # another test process (pytest-xdist's workers) renamed its complete copy first: keep that one
        shutil.rmtree(staging)
        if not all((target / name).is_file() for name in FILES):
            raise


def _download_and_extract(target: pathlib.Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp,
                              f"salesforce-lavis=={LAVIS_VERSION}"], capture_output=True, text=True, timeout=600)
        wheels = sorted(pathlib.Path(tmp).glob(f"salesforce_lavis-{LAVIS_VERSION}-*.whl"))
        if run.returncode != 0 or not wheels:
            raise RuntimeError(f"`pip download salesforce-lavis=={LAVIS_VERSION}` failed: "
                               f"{(run.stderr or run.stdout).strip().splitlines()[-1:]}")
        _extract(wheels[0], target)


def find_lavis_dir() -> pathlib.Path:
    """The folder holding `lavis/...` (the files of `FILES`), extracting or downloading the wheel when needed."""
    target = cache_root() / f"lavis-{LAVIS_VERSION}"
    if all((target / name).is_file() for name in FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # an extraction with fewer files (an older FILES): redo it
        shutil.rmtree(target)
    wheel = os.environ.get(WHEEL_ENV)
    if wheel:
        _extract(pathlib.Path(wheel), target)
    else:
        _download_and_extract(target)
    return target


# ---------------------------------------------------------------------------------------------------------- stand-ins

class _Registry:
    """`lavis.common.registry.registry`: only its `register_model` decorator is used (at class definition)."""

    @staticmethod
    def register_model(name):
        return lambda cls: cls


class _BaseModel(nn.Module):
    """`lavis.models.base_model.BaseModel`, of which `Blip2Qformer` uses only `device` (base_model.py, 1.0.2)."""

    @property
    def device(self):
        return list(self.parameters())[0].device


def _identity_gather(tensor):
    """LAVIS's `concat_all_gather` / `all_gather_with_grad` in one process: both return their argument (base_model.py
    returns early when `world_size == 1`, resp. when `torch.distributed` is not initialised)."""
    return tensor


def _unavailable(what):
    def fail(*args, **kwargs):
        raise NotImplementedError(f"{what} is a stand-in in tests/lavis_reference.py: not available")
    return fail


def _stand_ins(lavis_dir: pathlib.Path) -> dict:
    modules = {}
    for name in _PACKAGES:  # packages whose __init__.py is not run (lavis/models/__init__.py imports every model)
        package = types.ModuleType(name)
        package.__path__ = [str(lavis_dir.joinpath(*name.split(".")))]
        modules[name] = package
    stand_ins = {
        "lavis.common.registry": {"registry": _Registry()},
        "lavis.common.dist_utils": {"is_dist_avail_and_initialized": lambda: False, "get_rank": lambda: 0,
                                    "get_world_size": lambda: 1, "is_main_process": lambda: True,
                                    "download_cached_file": _unavailable("download_cached_file")},
        "lavis.common.utils": {"is_url": lambda name: str(name).startswith(("http://", "https://")),
                               "get_abs_path": _unavailable("get_abs_path")},
        "lavis.common.logger": {"MetricLogger": _unavailable("MetricLogger")},
        "lavis.models.base_model": {"BaseModel": _BaseModel, "concat_all_gather": _identity_gather,
                                    "all_gather_with_grad": _identity_gather},
        "lavis.models.eva_vit": {"create_eva_vit_g": _unavailable("create_eva_vit_g (EVA-ViT-g)")},
        "lavis.models.clip_vit": {"create_clip_vit_L": _unavailable("create_clip_vit_L (CLIP ViT-L)")},
    }
    for name, attributes in stand_ins.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        modules[name] = module
    for name, module in modules.items():  # `import a.b.c` binds c on a.b: do the same for the stand-ins
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    return modules


def _find_pruneable_heads_and_indices(*args, **kwargs):
    raise NotImplementedError("head pruning (transformers 4's find_pruneable_heads_and_indices, removed in 5) is not "
                              "used by BLIP-2")


@contextlib.contextmanager
def _transformers_4_names():
    """While `Qformer.py` is imported, `transformers.modeling_utils` is seen through a module that also has the three
    names it imports from there in transformers 4: `apply_chunking_to_forward` and `prune_linear_layer` (moved to
    `transformers.pytorch_utils`) and `find_pruneable_heads_and_indices` (removed; only head pruning used it)."""
    import transformers.modeling_utils as real
    import transformers.pytorch_utils as pytorch_utils

    view = types.ModuleType(real.__name__)
    view.__dict__.update(real.__dict__)
    view.apply_chunking_to_forward = pytorch_utils.apply_chunking_to_forward
    view.prune_linear_layer = pytorch_utils.prune_linear_layer
    view.find_pruneable_heads_and_indices = _find_pruneable_heads_and_indices
    with mock.patch.dict(sys.modules, {real.__name__: view}):
        yield


def _get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
    """transformers 4's `ModuleUtilsMixin.get_head_mask` (removed in 5) for the only case BLIP-2 uses: no head mask."""
    if head_mask is not None:
        raise NotImplementedError("head masks are not used by BLIP-2")
    return [None] * num_hidden_layers


def _invert_attention_mask(self, encoder_attention_mask):
    """transformers 4.26's `ModuleUtilsMixin.invert_attention_mask` (removed in 5): 1 -> 0, 0 -> dtype's minimum."""
    if encoder_attention_mask.dim() == 3:
        extended = encoder_attention_mask[:, None, :, :]
    if encoder_attention_mask.dim() == 2:
        extended = encoder_attention_mask[:, None, None, :]
    extended = extended.to(dtype=self.dtype)
    return (1.0 - extended) * torch.finfo(self.dtype).min


def _init_weights_4(self):
    """transformers 4.26's `PreTrainedModel.init_weights`, which LAVIS's `BertModel` and `BertLMHeadModel` call at the
    end of `__init__`: `_init_weights` on every module, then the output embeddings tied to the input ones when
    `tie_word_embeddings` (transformers 5's version needs `post_init()`, which LAVIS's classes never call)."""
    self.apply(self._init_weights)
    output_embeddings = self.get_output_embeddings()
    if output_embeddings is not None and getattr(self.config, "tie_word_embeddings", True):
        output_embeddings.weight = self.get_input_embeddings().weight  # 4.26's `_tie_or_clone_weights`


def _patch_qformer(qformer: types.ModuleType) -> None:
    """Give LAVIS's `BertPreTrainedModel` the transformers-4 methods its classes call: `init_weights` (replaced),
    `get_head_mask` and `invert_attention_mask` (gone from transformers 5)."""
    qformer.BertPreTrainedModel.init_weights = _init_weights_4
    for name, method in (("get_head_mask", _get_head_mask), ("invert_attention_mask", _invert_attention_mask)):
        if not hasattr(qformer.BertPreTrainedModel, name):
            setattr(qformer.BertPreTrainedModel, name, method)


def _import(lavis_dir: pathlib.Path) -> types.SimpleNamespace:
    import importlib.util

    stand_ins = _stand_ins(lavis_dir)
    foreign = [name for name in stand_ins if name in sys.modules and sys.modules[name] is not stand_ins[name]
               and not getattr(sys.modules[name], "__vlm_fusion_lavis__", False)]
    if foreign:
        raise RuntimeError(f"another `lavis` is already imported ({foreign[0]}): cannot load LAVIS {LAVIS_VERSION}'s "
                           "files under the same names")
    for module in stand_ins.values():
        module.__vlm_fusion_lavis__ = True
    sys.modules.update(stand_ins)
    loaded = {}
    for path in FILES:
        name = path[:-len(".py")].replace("/", ".")
        spec = importlib.util.spec_from_file_location(name, lavis_dir / path)
        module = importlib.util.module_from_spec(spec)
        module.__vlm_fusion_lavis__ = True
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, module)
        context = _transformers_4_names() if child == "Qformer" else contextlib.nullcontext()
        with context:
            spec.loader.exec_module(module)
        loaded[child] = module
    _patch_qformer(loaded["Qformer"])
    # `Blip2Qformer.forward` calls `torch.distributed.get_rank()` (bound as `dist` in blip2_qformer.py), which raises
    # outside a process group: one process is rank 0
    loaded["blip2_qformer"].dist = types.SimpleNamespace(get_rank=lambda: 0, get_world_size=lambda: 1)
    return types.SimpleNamespace(version=LAVIS_VERSION, path=lavis_dir, Qformer=loaded["Qformer"],
                                 blip2=loaded["blip2"], blip2_qformer=loaded["blip2_qformer"],
                                 blip_outputs=loaded["blip_outputs"])


def lavis_modules() -> types.SimpleNamespace:
    """LAVIS's modules (`Qformer`, `blip2`, `blip2_qformer`, `blip_outputs`), imported once; skips the calling test
    when the wheel cannot be had."""
    global _loaded, _unavailable_reason
    if _loaded is None:
        if _unavailable_reason is None:  # one attempt per session: a failed download is not retried by every test
            try:
                _loaded = _import(find_lavis_dir())
                return _loaded
            except (RuntimeError, OSError, KeyError, zipfile.BadZipFile, subprocess.SubprocessError) as error:
                _unavailable_reason = (f"LAVIS {LAVIS_VERSION} (its wheel, for the BLIP-2 reference) cannot be had: "
                                       f"{error}. Set {WHEEL_ENV} to a downloaded "
                                       f"salesforce_lavis-{LAVIS_VERSION}-py3-none-any.whl to run this.")
        pytest.skip(_unavailable_reason)
    return _loaded


# ------------------------------------------------------------------------------------------------------------- model

class _GivenTokens:
    """Stand-in for LAVIS's `BertTokenizer` (bert-base-uncased plus a `[DEC]` bos token, `Blip2Base.init_tokenizer`):
    `forward` calls it on `samples["text_input"]`, which here is already a `BatchEncoding` of `input_ids` and
    `attention_mask`; it is returned as it is. (The real tokenizer pads to `max_txt_len`, `padding="max_length"`;
    padded positions are masked and carry `pad_token_id`, so padding does not change the losses.)"""

    def __init__(self, bos_token_id: int, pad_token_id: int):
        self.bos_token_id = bos_token_id
        self.pad_token_id = pad_token_id

    def __call__(self, text, padding=None, truncation=None, max_length=None, return_tensors=None):
        if text["input_ids"].shape[1] > max_length:
            raise ValueError(f"{text['input_ids'].shape[1]} tokens, more than max_txt_len={max_length}: LAVIS's "
                             "tokenizer would truncate them; pass at most max_txt_len tokens")
        return text


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers 5's warnings about LAVIS's transformers-4 code: `BertLMHeadModel` defines
    `prepare_inputs_for_generation` without inheriting `GenerationMixin` (`generate` is not used here), and
    `output.past_key_values` is now `output.cache` (the old name still reads it)."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def build_lavis_qformer(*, vision_width, hidden_size, num_layers, num_heads, intermediate_size, cross_attention_freq,
                        num_query_tokens, vocab_size, max_position_embeddings, embed_dim, max_txt_len,
                        pad_token_id=0, bos_token_id, seed=0, jitter=0.02):
    """A tiny LAVIS `Blip2Qformer` in eval mode, built without its `__init__` (which loads EVA-ViT-g and
    bert-base-uncased from the network), with the attributes `forward` uses set as `__init__` sets them
    (blip2_qformer.py and `Blip2Base.init_Qformer` in blip2.py, 1.0.2), except:

    - `Qformer` is LAVIS's `BertLMHeadModel(config)`, initialised by LAVIS's own `_init_weights` (normal(0,
      initializer_range) for Linear and Embedding weights, zero biases, unit LayerNorms), where `init_Qformer` loads
      bert-base-uncased (`from_pretrained` leaves the weights bert lacks, cross-attention and query FFNs, so);
      `config` is bert-base-uncased's (transformers' `BertConfig` defaults) with the given sizes, plus what
      `init_Qformer` adds (`encoder_width`, `add_cross_attention`, `cross_attention_freq`, `query_length`);
    - the query FFNs (`intermediate_query`, `output_query`) keep their own random weights: `__init__` copies the text
      FFNs into them, which would hide a converter that maps one for the other;
    - with `jitter > 0` (default), every bias and LayerNorm parameter (all zero / one after the init above, and
      `ln_vision`'s) gets normal(0, jitter) noise, so a swapped bias or norm shows up too; `jitter=0` keeps LAVIS's
      init;
    - `visual_encoder` returns its input: callers give patch features `(B, V, vision_width)` as the images;
    - `tokenizer` is `_GivenTokens` (callers give token ids), with vocabulary `vocab_size`, so no
      `resize_token_embeddings` (LAVIS resizes bert's 30522 to 30523 for `[DEC]`).

    As with transformers 4's `init_weights()` (`tie_word_embeddings` defaults to true), the LM head's decoder weight is
    the word embedding matrix. Weights are drawn from `torch.manual_seed(seed)` without touching the global RNG.
    """
    lavis = lavis_modules()
    from transformers import BertConfig

    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, intermediate_size=intermediate_size,
                        max_position_embeddings=max_position_embeddings, pad_token_id=pad_token_id)
    config.position_embedding_type = "absolute"  # as bert-base-uncased's config.json (transformers 5 dropped the field)
    # what `Blip2Base.init_Qformer` sets on bert-base-uncased's config
    config.encoder_width = vision_width
    config.add_cross_attention = True
    config.cross_attention_freq = cross_attention_freq
    config.query_length = num_query_tokens

    model = object.__new__(lavis.blip2_qformer.Blip2Qformer)
    nn.Module.__init__(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # the order of `Blip2Qformer.__init__`: tokenizer, vision encoder + ln_vision, Q-Former + queries, heads, temp
        model.tokenizer = _GivenTokens(bos_token_id=bos_token_id, pad_token_id=pad_token_id)
        model.visual_encoder = nn.Identity()
        model.ln_vision = lavis.blip2.LayerNorm(vision_width)
        with _quiet_transformers():
            model.Qformer = lavis.Qformer.BertLMHeadModel(config)
        query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, config.hidden_size))
        query_tokens.data.normal_(mean=0.0, std=config.initializer_range)
        model.query_tokens = query_tokens
        model.vision_proj = nn.Linear(config.hidden_size, embed_dim)
        model.text_proj = nn.Linear(config.hidden_size, embed_dim)
        model.itm_head = nn.Linear(config.hidden_size, 2)
        model.temp = nn.Parameter(0.07 * torch.ones([]))
        model.max_txt_len = max_txt_len
        if jitter:
            with torch.no_grad():
                for name, parameter in model.named_parameters():  # tied parameters are listed once
                    if name.endswith("bias") or ".LayerNorm." in name or name.startswith("ln_vision."):
                        parameter.add_(torch.randn_like(parameter) * jitter)
    return model.eval()


# ------------------------------------------------------------------------------------------------------------ losses

@contextlib.contextmanager
def _locals_of(code, into: dict):
    """Copy the local variables of the frame running `code` into `into` when it returns (`sys.setprofile`; a profiler
    already set keeps receiving its events)."""
    previous = sys.getprofile()

    def profile(frame, event, arg):
        if event == "return" and frame.f_code is code:
            into.update(frame.f_locals)
        if previous is not None:
            previous(frame, event, arg)

    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(previous)


def lavis_stage1_losses(model, image_embeds, input_ids, attention_mask, *, negative_image_index, negative_text_index,
                        image_ids=None) -> dict:
    """Run LAVIS's `Blip2Qformer.forward` (eval mode, one process) on patch features `image_embeds` (before
    `ln_vision`, `(B, V, vision_width)`) and tokenized captions `input_ids` / `attention_mask` (`(B, T)`, first token
    [CLS], padding = `pad_token_id`), with B >= 2 (`forward` squeezes the `(B, B, queries)` similarities).

    The ITM hard negatives, drawn in `forward` by `torch.multinomial(weights_t2i[b], 1)` (a negative image for text b)
    then `torch.multinomial(weights_i2t[b], 1)` (a negative text for image b), are `negative_image_index[b]` and
    `negative_text_index[b]`; an index LAVIS could not draw (weight 0: the positive itself) is refused.

    Returns LAVIS's `loss_itc`, `loss_itm`, `loss_lm` and `loss` (their sum) with their graphs, plus `forward`'s own
    intermediate tensors, detached: `sim_i2t`, `sim_t2i` (similarities divided by `temp`, `(B, B)`), `weights_t2i`,
    `weights_i2t` (softmax + 1e-4 with a zero diagonal, what the negatives are drawn from), `image_feats`
    (`(B, queries, embed_dim)`) and `text_feat` (`(B, embed_dim)`), both normalised, `itm_logits` (`(3B, 2)`, rows:
    positive pairs, (text b, negative image), (image b, negative text)) and `itm_labels`, `lm_logits` (`(B, T, vocab)`,
    unshifted) and `lm_labels` (`[DEC]` in place of [CLS], -100 at padding; unshifted).

    `image_ids` (several captions of one image) would go into `samples["image_id"]`, but LAVIS 1.0.2's `forward` has no
    `image_id` branch (it came later): it is refused rather than silently ignored.
    """
    lavis = lavis_modules()
    if image_ids is not None:
        if '"image_id" in samples' not in pathlib.Path(lavis.blip2_qformer.__file__).read_text():
            raise ValueError(f"LAVIS {lavis.version}'s Blip2Qformer.forward has no `image_id` branch: every caption is "
                             "the only positive of its own image")
    from transformers import BatchEncoding

    model.eval()
    batch = image_embeds.shape[0]
    picks = [int(i) for i in negative_image_index] + [int(i) for i in negative_text_index]
    if len(picks) != 2 * batch:
        raise ValueError(f"need {batch} negative images and {batch} negative texts, got {len(picks)} indices in all")
    drawn = []

    def multinomial(weights, num_samples, *args, **kwargs):
        index = picks[len(drawn)]
        if weights[index] == 0:
            raise ValueError(f"negative #{len(drawn)} is index {index}, whose weight is 0: LAVIS never draws it")
        drawn.append(index)
        return torch.tensor([index], device=weights.device)

    samples = {"image": image_embeds,
               "text_input": BatchEncoding({"input_ids": input_ids, "attention_mask": attention_mask})}
    if image_ids is not None:
        samples["image_id"] = image_ids
    frame = {}
    with mock.patch.object(torch, "multinomial", multinomial), _quiet_transformers(), \
            _locals_of(lavis.blip2_qformer.Blip2Qformer.forward.__code__, frame):
        output = model(samples)
    assert len(drawn) == 2 * batch, f"forward drew {len(drawn)} negatives, expected {2 * batch}"

    result = {"loss": output.loss, "loss_itc": output.loss_itc, "loss_itm": output.loss_itm, "loss_lm": output.loss_lm}
    for ours, theirs in (("sim_i2t", "sim_i2t"), ("sim_t2i", "sim_t2i"), ("weights_t2i", "weights_t2i"),
                         ("weights_i2t", "weights_i2t"), ("image_feats", "image_feats"), ("text_feat", "text_feat"),
                         ("itm_logits", "logits"), ("itm_labels", "itm_labels"), ("lm_labels", "labels")):
        result[ours] = frame[theirs].detach()
    result["lm_logits"] = frame["lm_output"].logits.detach()
    return result


def lavis_state_dict(model) -> dict:
    """`model.state_dict()`: LAVIS's key names, those of `blip2_pretrained.pth`'s `"model"` (LAVIS's
    `RunnerBase._save_checkpoint` drops parameters without `requires_grad`, i.e. the frozen `visual_encoder.*`; ours
    has no weights). The tied LM decoder weight (and bias) appear under both of their names, as `torch.save` keeps
    them; `Qformer.bert.embeddings.position_ids` is a persistent buffer in LAVIS's `BertEmbeddings`."""
    return model.state_dict()
