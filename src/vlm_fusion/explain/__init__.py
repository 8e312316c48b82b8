"""Where did the model look? Per-token heatmaps over the images, for all three families.

```python
from vlm_fusion.explain import explain
result = explain(model, processor, [image], "USER: <image>\\nwhat colour is the circle ?\\nASSISTANT:")
result.tokens              # the answer's tokens
result.maps()[0]           # image 0: (tokens, h, w), one heatmap per token, mean over layers and heads
result.layer_maps[0]       # image 0: (tokens, layers, heads, h, w), the numbers the maps are made of
```

What a map is: attention, followed along the family's route from the text token to the image's patches (see
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

from dataclasses import dataclass, field

import torch
from PIL import Image

from .routes import ROUTES, ExplainError, gate_values

__all__ = ["explain", "Explanation", "ExplainError"]


@dataclass
class Explanation:
    family: str  # the model_type: fusion_llava, fusion_blip2, fusion_flamingo
    prompt: str
    images: list  # the PIL images as given
    token_ids: list[int]  # the answer's tokens, as generated
    tokens: list[str]  # each token decoded alone
    layer_maps: list[torch.Tensor]  # per image (T, L, H, h, w): attention mass on each patch cell
    image_share: torch.Tensor  # (T, L, H, I): the share of the token's attention on each image's positions
    layers: list[str]  # what the route's L layers are: the LM's decoder layers, or the gated blocks' layers
    regions: list[tuple[float, float, float, float]]  # per image, the (left, top, right, bottom) the map covers
    gates: dict[str, float] = field(default_factory=dict)  # Flamingo: |tanh(attn_gate)| by decoder layer

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


def explain(model, processor, images: list, prompt: str, *, max_new_tokens: int = 32, progress=None) -> Explanation:
    """
    Generate greedily from `prompt` (with one `<image>` marker per image, as the processor takes it) and return, for
    every answer token, a heatmap over each image. `progress` (e.g. `tqdm.auto.tqdm`) wraps the steps.
    """
    family = model.config.model_type
    if family not in ROUTES:
        raise ExplainError(f"{type(model).__name__} ({family}) is not a vlm-fusion model: explain takes "
                           f"{', '.join(sorted(ROUTES))}")
    check_inputs(processor, images, prompt, family)
    if family != "fusion_flamingo" and getattr(model.config.text_config, "num_attention_heads", None) is None:
        raise ExplainError(f"the language model ({model.config.text_config.model_type}) has no attention layers, "
                           "whose weights the maps are made of")
    bar = progress(total=2, desc="explain: generate, then attention") if progress else None
    images_rgb = [image.convert("RGB") for image in images]
    inputs = processor(images=images_rgb, text=[prompt], return_tensors="pt")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    if bar is not None:
        bar.update()
    prompt_length = inputs["input_ids"].shape[1]
    answer = out[0, prompt_length:]
    if len(answer) == 0:
        raise ExplainError("the model generated no token")
    full = {**inputs, "input_ids": out[:, : prompt_length + len(answer)],
            "attention_mask": torch.ones_like(out[:, : prompt_length + len(answer)])}
    rows = torch.arange(prompt_length - 1, prompt_length - 1 + len(answer), device=device)  # each token's predictor
    layer_maps, share = ROUTES[family](model, full, rows)
    if bar is not None:
        bar.update()
        bar.close()
    gates = gate_values(model) if family == "fusion_flamingo" else {}
    layers = list(gates) if gates else [str(i) for i in range(layer_maps[0].shape[1])]
    anyres = getattr(model.model, "anyres", None) is not None
    result = Explanation(
        family=family, prompt=prompt, images=list(images), token_ids=answer.tolist(),
        tokens=[processor.decode([int(t)]) for t in answer], layer_maps=[m.cpu() for m in layer_maps],
        image_share=share.cpu(), layers=layers, regions=[_region(processor, im, anyres) for im in images], gates=gates,
    )
    return result
