"""Where did the model look? Per-token heatmaps over the images, for all three families.

```python
from vlm_fusion.explain import explain
result = explain(model, processor, [image], "USER: <image>\\nwhat colour is the circle ?\\nASSISTANT:")
result.tokens              # the answer's tokens
result.maps()[0]           # image 0: (tokens, h, w), one heatmap per token, mean over layers and heads
result.layer_maps[0]       # image 0: (tokens, layers, heads, h, w), the numbers the maps are made of
explain(model, processor, [image], prompt, method="relevance")   # or "occlusion"; "attention" is the default
```

Three methods (`METHODS`), one `Explanation` each:

- `"relevance"`: gradient-weighted attention propagated through the LM, the bridge and the vision tower (Chefer,
  Gur & Wolf, ICCV 2021; see `relevance`): one backward pass per answer token. Attribution: which patches the token's
  logit depends on through attention.
- `"occlusion"`: the fall in the token's log-odds when a cell of the image is replaced by its mean colour, a blur or
  its background colour (see `occlusion`): one forward pass per cell, batched; causal, the reference the others are
  judged by.
- `"attention"`: the raw view, described below.

For `relevance` and `occlusion`, `layer_maps` is `(T, 1, 1, h, w)` (one layer "all", one head) and `maps()` returns
it as it is: relevance is >= 0, occlusion is a fall in log-odds (negative where removing a cell made the token more
likely). `faithfulness.evaluate` scores the methods (pointing game, deletion / insertion AUC).

What an attention map is: attention, followed along the family's route from the text token to the image's patches (see
`routes`), averaged over the layers and heads you pick. LLaVA- and BLIP-2-style maps are normalised to sum to one
over each image: they say where in the image the token's attention to that image went, not how much went there
(`image_share` says that; most of it usually goes elsewhere). Flamingo-style maps are weighted by each gated
block's |tanh(gate)| and not normalised: a block that the gate shuts contributes nothing, and a model whose gates are
all 0 shows nothing at all. What a map is not: attribution. Attention says which positions were read, not which of
them changed the answer.

The answer is generated greedily with the model as it is; the maps come from one more forward pass over prompt and
answer, with the LM's attention switched to `eager` (the implementation that returns weights) for that call and
back afterwards. The bridges' own attention (Q-Former, resampler, gated blocks) is recomputed from their inputs.
"""

import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from .occlusion import BASELINES, occlusion_maps
from .relevance import relevance_maps
from .routes import ROUTES, ExplainError, gate_values

__all__ = ["explain", "Explanation", "ExplainError", "METHODS"]

METHODS = ("relevance", "occlusion", "attention")


@dataclass
class Explanation:
    family: str  # the model_type: fusion_llava, fusion_blip2, fusion_flamingo
    prompt: str
    images: list  # the PIL images as given
    token_ids: list[int]  # the answer's tokens, as generated
    tokens: list[str]  # each token decoded alone
    layer_maps: list[torch.Tensor]  # per image (T, L, H, h, w): attention mass on each patch cell
    image_share: torch.Tensor | None  # attention: (T, L, H, I), the share of the token's attention on each image
    layers: list[str]  # what the route's L layers are: the LM's decoder layers, or the gated blocks' layers
    regions: list[tuple[float, float, float, float]]  # per image, the (left, top, right, bottom) the map covers
    gates: dict[str, float] = field(default_factory=dict)  # Flamingo: |tanh(attn_gate)| by decoder layer
    method: str = "attention"  # one of METHODS
    question: str | None = None  # the user's question, when the prompt is a template around it
    special: list[bool] = field(default_factory=list)  # per answer token: a special token (</s>, ...)?
    seconds: float = 0.0  # the time the maps took (the answer's generation not counted)

    @property
    def answer(self) -> str:
        return "".join(self.tokens)

    def weights(self, layers=None) -> torch.Tensor:
        """`(L,)` each layer's weight in the mean: 1 for the chosen layers, times |tanh(gate)| for Flamingo."""
        chosen = torch.zeros(len(self.layers))
        chosen[list(range(len(self.layers))) if layers is None else list(layers)] = 1.0
        if self.gates:
            chosen = chosen * torch.tensor([self.gates[name] for name in self.layers])
        return chosen

    def maps(self, layers=None, heads=None) -> list[torch.Tensor]:
        """Per image `(T, h, w)`: the mean over `layers` and `heads` (indices; all by default); see the module doc."""
        if self.method != "attention":
            return [raw[:, 0, 0] for raw in self.layer_maps]
        out = []
        for raw in self.layer_maps:
            selected = raw if heads is None else raw[:, :, list(heads)]
            count = len(self.layers) if layers is None else len(list(layers))
            mean = torch.einsum("tlhyx,l->tyx", selected, self.weights(layers)) / (count * selected.shape[2])
            if not self.gates:  # where within the image: sums to one over it
                mean = mean / mean.sum((-1, -2), keepdim=True).clamp_min(1e-12)
            out.append(mean)
        return out

    def peak(self, token: int, image: int = 0) -> tuple[int, int]:
        """(row, column) of the patch cell with the most weight in the default map of `token` over `image`."""
        heat = self.maps()[image][token]
        index = int(heat.flatten().argmax())
        return divmod(index, heat.shape[-1])


def _region(processor, image: Image.Image, anyres: bool) -> tuple[float, float, float, float]:
    """The part of `image` the tower saw as its input square (the whole image with anyres or a squashing resize)."""
    width, height = image.size
    if anyres:
        return 0.0, 0.0, float(width), float(height)
    side = max(width, height)
    if getattr(processor, "pad_to_square", False):  # padded out to a square around the image
        return (width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2
    images = getattr(processor, "image_processor", None)
    if getattr(images, "do_center_crop", False) and "shortest_edge" in (getattr(images, "size", None) or {}):
        side = min(width, height)  # shortest edge resized to the crop, then the centre cut out
        return (width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2
    return 0.0, 0.0, float(width), float(height)


def check_inputs(processor, images, prompt: str, family: str) -> None:
    """One line for a prompt whose `<image>` markers and images do not match, or an image that is not an image.
    A BLIP-2-style prompt may hold no marker for its one image: the processor puts the queries in front."""
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ExplainError(f"image {index} is a {type(image).__name__}, not a PIL image")
    token = processor.image_token
    in_front = family == "fusion_blip2" and prompt.count(token) == 0 and len(images) == 1
    if prompt.count(token) != len(images) and not in_front:
        raise ExplainError(f"the prompt holds {prompt.count(token)} {token} markers and {len(images)} image"
                           f"{'s were' if len(images) != 1 else ' was'} given: one marker per image")
    if not images:
        raise ExplainError("no image given: there is nothing to look at")


def check_method(model, method: str, family: str) -> None:
    """One line for a method the model cannot support, before anything runs."""
    if method not in METHODS:
        raise ExplainError(f"unknown method {method!r}: one of {', '.join(METHODS)}")
    anyres = getattr(model.model, "anyres", None) is not None
    if method == "occlusion":  # any model with logits: it only reads the answer's probabilities
        if anyres:
            raise ExplainError("method 'occlusion' does not lay its cells over anyres tiles yet (each tile is resized "
                               "apart): use --method attention")
        return
    text = model.config.text_config
    if family != "fusion_flamingo" and getattr(text, "num_attention_heads", None) is None:
        raise ExplainError(f"method {method!r} needs the language model's attention weights and this one "
                           f"({text.model_type}) has no attention layers: use --method occlusion")
    if method == "relevance" and anyres:
        raise ExplainError("method 'relevance' does not follow anyres tiles back to the image yet "
                           "(the tower sees each tile apart): use --method attention or occlusion")


def explain(model, processor, images: list, prompt: str, *, method: str = "attention", max_new_tokens: int = 32,
            token_ids=None, question: str | None = None, baseline: str = "mean", grid=None, batch_size: int = 16,
            progress=None) -> Explanation:
    """
    Generate greedily from `prompt` (with one `<image>` marker per image, as the processor takes it) and return, for
    every answer token, a map over each image made by `method` (one of `METHODS`). `token_ids` explains that answer
    instead of generating one. `baseline` ("mean" or "blur"), `grid` (`(rows, columns)` of cells, the tower's patch
    grid by default) and `batch_size` (masked images per forward pass) are occlusion's. `question` is shown on the
    page. `progress` (e.g. `tqdm.auto.tqdm`) wraps the steps.
    """
    family = model.config.model_type
    if family not in ROUTES:
        raise ExplainError(f"{type(model).__name__} ({family}) is not a vlm-fusion model: explain takes "
                           f"{', '.join(sorted(ROUTES))}")
    check_method(model, method, family)
    check_inputs(processor, images, prompt, family)
    if baseline not in BASELINES:
        raise ExplainError(f"unknown baseline {baseline!r}: one of {', '.join(BASELINES)}")
    images_rgb = [image.convert("RGB") for image in images]
    inputs = processor(images=images_rgb, text=[prompt], return_tensors="pt")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    if token_ids is None:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answer = out[0, inputs["input_ids"].shape[1]:]
    else:
        answer = torch.as_tensor(list(token_ids), dtype=torch.long, device=device)
    if len(answer) == 0:
        raise ExplainError("the model generated no token")
    prompt_length = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"][0], answer])[None]
    full = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows = torch.arange(prompt_length - 1, prompt_length - 1 + len(answer), device=device)  # each token's predictor
    started = time.perf_counter()
    gates, share = {}, None
    if method == "attention":
        layer_maps, share = ROUTES[family](model, full, rows)
        gates = gate_values(model) if family == "fusion_flamingo" else {}
        layers = list(gates) if gates else [str(i) for i in range(layer_maps[0].shape[1])]
        share = share.cpu()
    else:
        if method == "relevance":
            maps = relevance_maps(model, full, rows, answer, progress=progress)
        else:
            maps = occlusion_maps(model, full, rows, answer, grid=grid, baseline=baseline, batch_size=batch_size,
                                  progress=progress)
        layer_maps, layers = [m[:, None, None] for m in maps], ["all"]
    seconds = time.perf_counter() - started
    anyres = getattr(model.model, "anyres", None) is not None
    special_ids = set(getattr(processor.tokenizer, "all_special_ids", []) or [])
    return Explanation(
        family=family, prompt=prompt, images=list(images), token_ids=answer.tolist(),
        tokens=[processor.decode([int(t)]) for t in answer], layer_maps=[m.detach().float().cpu() for m in layer_maps],
        image_share=share, layers=layers, regions=[_region(processor, im, anyres) for im in images], gates=gates,
        method=method, question=question, special=[int(t) in special_ids for t in answer], seconds=seconds,
    )
