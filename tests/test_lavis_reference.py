"""Sanity checks of the LAVIS BLIP-2 stage-1 reference harness (`lavis_reference.py`) itself: that it builds a
well-initialised model, that LAVIS's losses come out of it as LAVIS computes them, and that the given ITM negatives
are the ones used. Skipped when LAVIS's wheel cannot be had."""

import pytest
import torch
import torch.nn.functional as F

from lavis_reference import build_lavis_qformer, lavis_stage1_losses, lavis_state_dict

TINY = dict(vision_width=24, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, cross_attention_freq=2,
            num_query_tokens=5, vocab_size=50, max_position_embeddings=40, embed_dim=16, max_txt_len=12,
            pad_token_id=0, bos_token_id=49)
BATCH, PATCHES, TOKENS = 3, 7, 8


@pytest.fixture(scope="module")
def model():
    return build_lavis_qformer(**TINY, seed=0)


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    image_embeds = torch.randn(BATCH, PATCHES, TINY["vision_width"], generator=generator)
    input_ids = torch.randint(5, TINY["bos_token_id"], (BATCH, TOKENS), generator=generator)
    input_ids[:, 0] = 1  # [CLS] (any id: LAVIS replaces it by bos_token_id for the ITG loss)
    attention_mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    attention_mask[1, 5:] = 0  # one padded caption
    input_ids[1, 5:] = TINY["pad_token_id"]
    return image_embeds, input_ids, attention_mask


def test_builds_with_lavis_keys_and_distinct_weights(model):
    state = lavis_state_dict(model)
    assert {key.split(".")[0] for key in state} == {"Qformer", "query_tokens", "vision_proj", "text_proj", "itm_head",
                                                     "temp", "ln_vision"}
    # cross-attention every `cross_attention_freq` layers, from layer 0
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in state
    assert not any(key.startswith("Qformer.bert.encoder.layer.1.crossattention.") for key in state)
    assert state["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"].shape == (32, TINY["vision_width"])
    assert state["temp"].item() == pytest.approx(0.07)
    # every parameter is drawn: finite, not constant, and no two of one shape are equal (jitter on biases and norms)
    parameters = dict(model.named_parameters())
    for name, parameter in parameters.items():
        assert torch.isfinite(parameter).all(), name
        assert parameter.numel() == 1 or parameter.std() > 0, name
    by_shape = {}
    for name, parameter in parameters.items():
        for other in by_shape.setdefault(parameter.shape, []):
            assert not torch.equal(parameter, parameters[other]), (name, other)
        by_shape[parameter.shape].append(name)
    for layer in range(TINY["num_layers"]):  # query FFNs are not copies of the text FFNs
        prefix = f"Qformer.bert.encoder.layer.{layer}."
        for text, query in (("intermediate.dense.weight", "intermediate_query.dense.weight"),
                            ("output.dense.weight", "output_query.dense.weight")):
            assert not torch.equal(state[prefix + text], state[prefix + query])
    # the LM decoder is tied to the word embeddings (transformers 4's tie_weights), as in LAVIS
    assert torch.equal(state["Qformer.cls.predictions.decoder.weight"],
                       state["Qformer.bert.embeddings.word_embeddings.weight"])
    # seeded: a second build is bit-identical
    again = lavis_state_dict(build_lavis_qformer(**TINY, seed=0))
    assert all(torch.equal(value, again[key]) for key, value in state.items())


def test_losses_are_lavis_own_formulas(model, batch):
    out = lavis_stage1_losses(model, *batch, negative_image_index=[1, 2, 0], negative_text_index=[2, 0, 1])
    for name in ("loss_itc", "loss_itm", "loss_lm"):
        assert torch.isfinite(out[name]), name
    assert torch.allclose(out["loss"], out["loss_itc"] + out["loss_itm"] + out["loss_lm"])
    targets = torch.arange(BATCH)
    itc = (F.cross_entropy(out["sim_i2t"], targets, label_smoothing=0.1)
           + F.cross_entropy(out["sim_t2i"], targets, label_smoothing=0.1)) / 2
    torch.testing.assert_close(out["loss_itc"].detach(), itc)
    torch.testing.assert_close(out["sim_t2i"], out["sim_i2t"].t())  # max over queries either way
    torch.testing.assert_close(out["loss_itm"].detach(), F.cross_entropy(out["itm_logits"], out["itm_labels"]))
    assert out["itm_labels"].tolist() == [1] * BATCH + [0] * (2 * BATCH)
    # ITG: [DEC] in place of [CLS], padding ignored, next-token cross-entropy with label smoothing 0.1
    _, input_ids, attention_mask = batch
    labels = out["lm_labels"]
    assert (labels[:, 0] == TINY["bos_token_id"]).all()
    assert torch.equal(labels[:, 1:] == -100, attention_mask[:, 1:] == 0)
    itg = F.cross_entropy(out["lm_logits"][:, :-1].reshape(-1, TINY["vocab_size"]), labels[:, 1:].reshape(-1),
                          label_smoothing=0.1)
    torch.testing.assert_close(out["loss_lm"].detach(), itg)
    # the sampling weights: softmax of the similarities + 1e-4, positives zeroed
    for weights, sim in ((out["weights_t2i"], out["sim_t2i"]), (out["weights_i2t"], out["sim_i2t"])):
        expected = (F.softmax(sim, dim=1) + 1e-4).fill_diagonal_(0)
        torch.testing.assert_close(weights, expected)


def test_negatives_are_honoured(model, batch):
    """Row BATCH + b of the ITM logits scores (text b, image negative_image_index[b]), row 2 * BATCH + b scores
    (image b, text negative_text_index[b]): the same pair through either branch gives the same logits."""
    first = lavis_stage1_losses(model, *batch, negative_image_index=[1, 2, 0], negative_text_index=[1, 2, 0])
    # pairs (image, text) of `first`'s negative-image rows: (1, 0), (2, 1), (0, 2); ask for them as negative texts
    second = lavis_stage1_losses(model, *batch, negative_image_index=[2, 0, 1], negative_text_index=[2, 0, 1])
    negative_images = first["itm_logits"][BATCH:2 * BATCH]
    negative_texts = second["itm_logits"][2 * BATCH:]
    torch.testing.assert_close(negative_texts, negative_images[[2, 0, 1]])
    torch.testing.assert_close(first["itm_logits"][:BATCH], second["itm_logits"][:BATCH])  # positives unchanged
    assert not torch.allclose(first["itm_logits"][2 * BATCH:], second["itm_logits"][2 * BATCH:])
    with pytest.raises(ValueError, match="never draws it"):  # the positive pair itself has weight 0
        lavis_stage1_losses(model, *batch, negative_image_index=[0, 2, 0], negative_text_index=[1, 2, 0])
