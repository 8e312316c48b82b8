"""Remote-code export: what `save_pretrained(..., remote_code=True)` needs so that `trust_remote_code=True` loads a
saved model or processor where vlm-fusion is not installed.

transformers writes a class's source file (and its same-folder relative imports) beside the weights, and an
`auto_map` into `config.json` / `processor_config.json`, for the classes whose `_auto_class` is set: this sets it for
the duration of one save, and unsets it after, so that ordinary saves stay package-only.
"""

from contextlib import contextmanager


@contextmanager
def registered_for_auto_classes(model=None, processor=None):
    """
    Register the classes for remote-code saving for the duration of one save (transformers keys off the class). A
    model with its head also maps `AutoModel` to its headless class, in the same file: `AutoModel.from_config(config,
    trust_remote_code=True)` builds that (vLLM's Transformers backend does), and transformers maps only the class saved.
    """
    targets, config, auto_map = [], None, None
    if model is not None:
        auto_class = "AutoModelForImageTextToText" if model.can_generate() else "AutoModel"
        targets += [(type(model.config), "AutoConfig"), (type(model), auto_class)]
        headless = getattr(model, "model", None)
        if model.can_generate() and headless is not None:
            config, auto_map = model.config, getattr(model.config, "auto_map", None)
            module = type(headless).__module__.rsplit(".", 1)[-1]
            config.auto_map = {**(auto_map or {}), "AutoModel": f"{module}.{type(headless).__name__}"}
    if processor is not None:
        targets.append((type(processor), "AutoProcessor"))
    previous = [cls.__dict__.get("_auto_class") for cls, _ in targets]
    for cls, auto_class in targets:
        cls._auto_class = auto_class
    try:
        yield
    finally:
        for (cls, _), value in zip(targets, previous):
            if value is None:
                del cls._auto_class
            else:
                cls._auto_class = value
        if config is not None:
            if auto_map is None:
                config.__dict__.pop("auto_map", None)
            else:
                config.auto_map = auto_map
