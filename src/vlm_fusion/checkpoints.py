"""How a vlm-fusion model meets its files: `from_pretrained`, `save_pretrained` and `push_to_hub`.

On top of transformers' own: 4-bit loading keeps the family's `_unquantized_modules` in full precision; checkpoints
in the *parts layout* (vlm-fusion < 0.2, and what the conversion tables target) load through a `key_mapping` and are
saved again in today's layout; saving writes a model card (and, with `remote_code=True`, the model's code). Below them, the strict reading the
conversion scripts and `qformer_from_bert` share: a checkpoint's tensors, renamed by a key table.
"""

import re

import torch

from .configuration_base import FusionConfig
from .language_model import causal_lm_class
from .quantization import remember_4bit_absmax, restore_portable_4bit_layout, with_unquantized_modules
from .remote_code import registered_for_auto_classes


# ---- a checkpoint's tensors, renamed by a key table (conversion scripts, `qformer_from_bert`) ---------------------
class ConversionError(RuntimeError):
    """A checkpoint does not map onto the target model exactly."""


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file or directory (safetensors shards, or torch `.bin` / `.pt` / `.pth` files)."""
    import glob
    import os

    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            files = sorted(f for ext in ("bin", "pt", "pth") for f in glob.glob(os.path.join(path, f"*.{ext}")))
        if not files:
            raise ConversionError(f"No weight files (*.safetensors, *.bin, *.pt, *.pth) in {path}.")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise ConversionError(f"Checkpoint not found: {path}")
    state_dict = {}
    for file in tqdm(files, desc="reading checkpoint", disable=len(files) < 2):
        if file.endswith(".safetensors"):
            state_dict.update(load_file(file))
        else:
            state_dict.update(unwrap_checkpoint(torch.load(file, map_location="cpu", weights_only=True), file))
    return state_dict


# Where training scripts put the weights in the objects they save: LAVIS's runner `{"model": ..., "optimizer": ...,
# "config": ..., "epoch": ...}`, Lightning `{"state_dict": ...}`, DeepSpeed/DDP dumps `{"module": ...}`.
CHECKPOINT_WRAPPERS = ("model", "state_dict", "module")


def unwrap_checkpoint(loaded, path: str) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded torch checkpoint: the object itself, or the one a training script wrapped."""
    if not isinstance(loaded, dict):
        raise ConversionError(f"{path} holds a {type(loaded).__name__}, not a state dict.")
    for key in CHECKPOINT_WRAPPERS:
        inner = loaded.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    others = sorted(k for k, v in loaded.items() if not isinstance(v, torch.Tensor))
    if others:
        raise ConversionError(
            f"{path} is neither a state dict nor one wrapped under {list(CHECKPOINT_WRAPPERS)}: its top-level keys "
            f"{preview(sorted(loaded))} include non-tensors ({preview(others)})."
        )
    return loaded


def rename_keys(state_dict: dict, rules: list[tuple[str, str | None]]) -> dict:
    """
    Rename every key with the first rule whose regex matches it (`re.sub` with the target template); a `None`
    target drops the key on purpose (e.g. a text branch the model does not have).

    Raises `ConversionError` listing the keys no rule consumes, or two keys mapped onto one target.
    """
    compiled = [(re.compile(pattern), target) for pattern, target in rules]
    renamed, unconsumed = {}, []
    for key in state_dict:
        for pattern, target in compiled:
            if pattern.search(key):
                if target is None:
                    break
                new_key = pattern.sub(target, key, count=1)
                if new_key in renamed:
                    raise ConversionError(f"Two source keys map onto {new_key!r} (the second is {key!r}).")
                renamed[new_key] = state_dict[key]
                break
        else:
            unconsumed.append(key)
    if unconsumed:
        raise ConversionError(f"{len(unconsumed)} source keys match no rule: {preview(unconsumed)}")
    return renamed


def preview(items, limit: int = 12) -> str:
    """The first `limit` of `items`, and how many more there are: for error messages."""
    items = list(items)
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def parts_key_mapping(config: FusionConfig, model_class) -> dict[str, str]:
    """
    Keys of the *parts layout* -> the model's own, as a transformers `key_mapping`. The parts layout names each part
    as it is built: `vision_tower.*`, each bridge module at the top level, and the whole causal LM's state dict under
    `language_model.*`. vlm-fusion < 0.2 saved checkpoints that way, and the conversion tables target it. The model's
    own keys all start with `model.` or `lm_head.`, so no rule touches them. `model_class` is the family's headless model,
    which names its bridge modules and parameters.
    """
    bridge = model_class._bridge_modules + model_class._bridge_parameters
    prefix = re.escape(causal_lm_class(config.text_config).base_model_prefix)
    mapping = {r"^language_model\.lm_head\.": "lm_head.", rf"^language_model\.{prefix}\.": "model.language_model."}
    for name in ["vision_tower", *bridge]:  # modules (`name.*`) and parameters (`name`) of the headless model
        mapping[rf"^{name}(?=\.|$)"] = f"model.{name}"
    return mapping


def _is_legacy_rule(conversion, legacy: dict[str, str]) -> bool:
    sources = getattr(conversion, "source_patterns", None) or []
    return any(pattern in legacy for pattern in sources)


def without_tied_copies(state_dict: dict, tied: dict) -> dict:
    """`state_dict` less each tied parameter (`tied`: target -> source) that equals its source: what transformers
    leaves out of a save when the two share memory, as they no longer do once gathered from shards."""
    drop = {target for target, source in (tied or {}).items() if target in state_dict and source in state_dict
            and state_dict[target].shape == state_dict[source].shape and state_dict[target].equal(state_dict[source])}
    return {k: v for k, v in state_dict.items() if k not in drop}


# What a save records of the machine that made it: `_name_or_path` of each part's config (the folder it was loaded
# from, often a temporary one), and how a tokenizer was loaded (`local_files_only`, `is_local`). None says anything
# about the model; a Hub id in `_name_or_path` does (where the part came from) and is kept.
LOADING_FLAGS = ("local_files_only", "is_local")
MACHINE_FIELDS = {"config.json": ("_name_or_path",), "tokenizer_config.json": LOADING_FLAGS,
                  "processor_config.json": LOADING_FLAGS}


def _is_machine_path(value) -> bool:
    import os

    return isinstance(value, str) and bool(value) and (os.path.isabs(value) or value.startswith(("./", "../", "~"))
                                                       or os.path.exists(value))


def _without_machine_fields(value, fields):
    """`value` (parsed JSON) less each of `fields` at any depth that is a local path (`_name_or_path`) or a loading
    flag (`LOADING_FLAGS`)."""
    if isinstance(value, dict):
        return {k: _without_machine_fields(v, fields) for k, v in value.items()
                if not (k in fields and (k in LOADING_FLAGS or _is_machine_path(v)))}
    if isinstance(value, list):
        return [_without_machine_fields(v, fields) for v in value]
    return value


def without_machine_details(save_directory) -> list[str]:
    """Remove from the JSON files a save wrote in `save_directory` what belongs to the machine that wrote them (see
    `MACHINE_FIELDS`); returns the files changed. The files keep transformers' layout (2-space indent, a final newline)
    and their key order."""
    import json
    import os

    changed = []
    for name, fields in MACHINE_FIELDS.items():
        path = os.path.join(save_directory, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        data = json.loads(text)
        clean = _without_machine_fields(data, fields)
        if clean != data:
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(clean, indent=2, ensure_ascii=False) + "\n")
            changed.append(path)
    return changed


class FusionCheckpointMixin:
    """`from_pretrained` / `save_pretrained` / `push_to_hub` of every vlm-fusion model (headless or with its head)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """
        `PreTrainedModel.from_pretrained`; a `quantization_config` keeps the family's `_unquantized_modules`, and
        checkpoints written by vlm-fusion < 0.2 load through a `key_mapping` (see `parts_key_mapping`).
        """
        headless = getattr(cls, "model_class", cls)
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = with_unquantized_modules(kwargs["quantization_config"],
                                                                     headless._unquantized_modules)
        legacy = None
        if kwargs.get("key_mapping") is None and getattr(headless, "legacy_parts_layout", True):
            config = kwargs.get("config")
            if not isinstance(config, FusionConfig):
                config_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only",
                                                        "subfolder", "trust_remote_code") if k in kwargs}
                config = cls.config_class.from_pretrained(pretrained_model_name_or_path, **config_kwargs)
            legacy = kwargs["key_mapping"] = parts_key_mapping(config, headless)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        loaded = model[0] if isinstance(model, tuple) else model  # (model, loading_info) with output_loading_info
        if legacy is not None:  # save in today's layout, not back in the old one
            conversions = getattr(loaded, "_weight_conversions", None) or []
            loaded._weight_conversions = [c for c in conversions if not _is_legacy_rule(c, legacy)]
        remember_4bit_absmax(loaded)
        return model

    def save_pretrained(self, save_directory, *args, remote_code: bool = False, repo_id: str | None = None,
                        tags=(), **kwargs):
        """
        `PreTrainedModel.save_pretrained`, plus a model card (`README.md`) rendered from the family's template.
        `remote_code=True` also writes the model's code beside the weights, so that `trust_remote_code=True`
        loads it where vlm-fusion is not installed. Nothing of the machine is written: the parts' `_name_or_path`
        that are local folders are left out of config.json (see `without_machine_details`).
        """
        restore_portable_4bit_layout(self)
        if kwargs.get("state_dict") is not None:  # gathered (FSDP, ZeRO-3): tied copies no longer share memory
            kwargs["state_dict"] = without_tied_copies(kwargs["state_dict"], getattr(self, "all_tied_weights_keys", {}))
        with registered_for_auto_classes(self if remote_code else None):
            result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            without_machine_details(save_directory)  # the parts' local folders in config.json
            try:
                from vlm_fusion.model_card import write_model_card
            except ImportError:  # exported code, running without vlm-fusion installed
                return result
            tags = [*(self.model_tags or []), *tags]
            write_model_card(self, save_directory, repo_id=repo_id, tags=tags, remote_code=remote_code)
        return result

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token=None, revision: str | None = None, create_pr: bool = False,
                    commit_description: str | None = None, tags=(), remote_code: bool = False,
                    max_shard_size="50GB"):
        """Upload what `save_pretrained` writes — weights, config, model card, and the code if `remote_code`."""
        import tempfile

        from huggingface_hub import create_repo

        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, max_shard_size=max_shard_size, remote_code=remote_code, repo_id=repo_id,
                                 tags=tags)
            return self._upload_modified_files(
                tmp, repo_id, files_timestamps={}, commit_message=commit_message or "Upload model", token=token,
                create_pr=create_pr, revision=revision, commit_description=commit_description,
            )
