"""BLIP-2's stage-1 model (`FusionBlip2ForImageTextRetrieval`): the Q-Former's attention patterns, ITC / ITM outputs
against a direct computation, positives and negatives of the losses, save / load, the zero-shot pipeline, bad input."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoProcessor, pipeline

from conftest import assert_reordered, changed_weights, random_image, reorder_bound
from vlm_fusion.modeling_qformer import attention_mask, draw_negatives
from vlm_fusion.tools.tiny import tiny_qformer_retrieval


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tiny_qformer_retrieval("siglip", qformer_dropout=0.0)


def batch(processor, captions, seeds=None):
    images = [random_image(seed, (32, 32)) for seed in (seeds or range(len(captions)))]
    return processor(images=images, text=captions, return_tensors="pt")


CAPTIONS = ["a red circle", "two blue squares on the left", "a small yellow star", "what is this"]


def test_the_masks_are_the_three_patterns_written_out():
    text_mask = torch.tensor([[1, 1, 0]])  # Q = 2 queries, T = 3 text positions, the last one padding
    y, n = True, False
    bidirectional = [[y, y, y, y, n]] * 5  # every position sees every query and every real text token
    causal = [[y, y, n, n, n], [y, y, n, n, n],  # queries: the queries only
              [y, y, y, n, n], [y, y, y, y, n], [y, y, y, y, n]]  # text t: every query and text 0..t (not padding)
    assert attention_mask("bidirectional", 2, text_mask).expand(1, 1, 5, 5)[0, 0].tolist() == bidirectional
    assert attention_mask("causal", 2, text_mask)[0, 0].tolist() == causal
    with pytest.raises(ValueError, match="pattern"):
        attention_mask("unimodal", 2, text_mask)


def test_queries_never_read_the_text_in_itg_and_text_never_reads_ahead(tiny):
    model, processor = tiny
    inputs = batch(processor, CAPTIONS[:2])
    vision = model.get_vision_embeddings(inputs["pixel_values"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    Q = model.config.num_query_tokens
    other = ids.clone()
    other[:, 2:] = (other[:, 2:] + 7) % model.config.qformer_vocab_size  # every text token from position 2 on
    with torch.no_grad():
        alone = model.qformer(vision)  # the image pass of ITC: queries only
        causal, causal_other = (model.qformer(vision, t, mask, pattern="causal") for t in (ids, other))
        both, both_other = (model.qformer(vision, t, mask, pattern="bidirectional") for t in (ids, other))
    # ITG: the queries' outputs are the image pass's, whatever the text
    assert_reordered(causal[:, :Q], alone)
    assert torch.equal(causal[:, :Q], causal_other[:, :Q])
    # ... and text position t does not see t + 1: positions 0 and 1 are unchanged, position 2 on changes
    assert torch.equal(causal[:, Q:Q + 2], causal_other[:, Q:Q + 2])
    assert not torch.allclose(causal[:, Q + 2], causal_other[:, Q + 2])
    # ITM (bidirectional): the queries do read the text (the control)
    assert not torch.allclose(both[:, :Q], both_other[:, :Q])
    # ITC's text side reads no image: the same text gives the same features beside any image
    with torch.no_grad():
        text = model.get_text_features(ids, mask)
        assert torch.equal(text, model.get_text_features(ids, mask))
        assert torch.equal(model.qformer(None, ids, mask), model.qformer(None, ids, mask))


def test_padding_is_invisible(tiny):
    model, processor = tiny
    inputs = batch(processor, CAPTIONS[:2])  # the second caption is longer: the first is padded
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert not mask.all()
    other = ids.masked_fill(mask == 0, 5)  # another token at the padded positions, still masked
    vision = model.get_vision_embeddings(inputs["pixel_values"])
    with torch.no_grad():
        for pattern in ("bidirectional", "causal"):
            a, b = (model.qformer(vision, t, mask, pattern=pattern) for t in (ids, other))
            keep = torch.cat([torch.ones(2, model.config.num_query_tokens, dtype=torch.bool), mask.bool()], 1)
            assert torch.equal(a[keep], b[keep]), pattern
        assert torch.equal(model.get_text_features(ids, mask), model.get_text_features(other, mask))


def test_itc_and_itm_outputs_are_the_heads_on_the_q_former(tiny):
    model, processor = tiny
    inputs = batch(processor, CAPTIONS[:3])
    with torch.no_grad():
        out = model(**inputs)
        vision = model.get_vision_embeddings(inputs["pixel_values"])
        queries = model.qformer(vision)  # (N, Q, D_q)
        text = model.qformer(None, inputs["input_ids"], inputs["attention_mask"])[:, 0]  # [CLS]
        image_feats = F.normalize(model.vision_projection(queries), dim=-1)
        text_feats = F.normalize(model.text_projection(text), dim=-1)
        cosine = torch.stack([torch.stack([(image_feats[i] @ text_feats[t]).max() for t in range(3)]) for i in range(3)])
        assert_reordered(out.logits_per_image, cosine / model.temperature)
        assert torch.equal(out.logits_per_text, out.logits_per_image.t())
        itm = model(**inputs, use_image_text_matching_head=True).logits_per_image
        joint = model.qformer(vision, inputs["input_ids"], inputs["attention_mask"])[:, : model.config.num_query_tokens]
        assert_reordered(itm, model.itm_head(joint).mean(1))
        assert itm.shape == (3, 2)
        # one image against several captions is paired with each of them
        one = {**inputs, "pixel_values": inputs["pixel_values"][:1]}
        torch.testing.assert_close(model(**one, use_image_text_matching_head=True).logits_per_image[0], itm[0])


def test_the_temperature_is_used_within_blips_range(tiny):
    model, processor = tiny
    inputs = batch(processor, CAPTIONS[:2])
    with torch.no_grad():
        reference = model(**inputs).logits_per_image * model.temperature
        model.temperature.fill_(10.0)  # drifted out of range: used as 0.5
        assert_reordered(model(**inputs).logits_per_image, reference / 0.5)
        model.temperature.fill_(model.config.temperature)


def test_captions_of_one_image_are_positives_and_never_its_negatives(tiny):
    model, processor = tiny
    inputs = batch(processor, CAPTIONS, seeds=[0, 0, 1, 2])  # pairs 0 and 1 show the same image
    image_ids = torch.tensor([7, 7, 8, 9])
    out = model(**inputs, return_loss=True, image_ids=image_ids)
    # ITC with both captions of image 7 as its positives, label smoothing 0.1
    targets = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1., 0], [0, 0, 0, 1.]])
    expected = (F.cross_entropy(out.logits_per_image, targets, label_smoothing=0.1)
                + F.cross_entropy(out.logits_per_text, targets, label_smoothing=0.1)) / 2
    torch.testing.assert_close(out.loss_itc, expected.detach())
    positives = image_ids[:, None] == image_ids[None, :]
    generator = torch.Generator().manual_seed(0)
    drawn = torch.stack([draw_negatives(torch.randn(4, 4), positives, generator) for _ in range(200)])  # (200, 4)
    assert not positives[torch.arange(4), drawn].any()
    assert set(drawn[:, 0].tolist()) == {2, 3}  # every non-positive can be drawn


def test_negatives_follow_the_generator(tiny):
    model, processor = tiny
    inputs = batch(processor, CAPTIONS)
    first, again = (model(**inputs, return_loss=True, negatives_generator=torch.Generator().manual_seed(3)).loss_itm
                    for _ in range(2))
    assert torch.equal(first, again)


def test_bad_batches_are_refused_with_the_reason(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="global batch of one pair"):
        model(**batch(processor, CAPTIONS[:1]), return_loss=True)
    with pytest.raises(ValueError, match="another image"):
        model(**batch(processor, CAPTIONS[:2], seeds=[0, 0]), return_loss=True, image_ids=torch.tensor([4, 4]))
    inputs = batch(processor, CAPTIONS[:2])
    with pytest.raises(ValueError, match="pairs"):
        model(pixel_values=inputs["pixel_values"][:1], input_ids=inputs["input_ids"], return_loss=True)
    with pytest.raises(ValueError, match="at most"):
        model.get_text_features(torch.ones(1, model.config.qformer_max_position_embeddings + 1, dtype=torch.long))


def test_captions_are_cut_at_max_text_length_as_lavis_cuts_them(tiny):
    _, processor = tiny
    long = " ".join(["red"] * 50)
    ids = processor(text=[long, "a red circle"])["input_ids"]
    assert len(ids[0]) == processor.max_text_length == 32 and ids[0][0] == processor.tokenizer.cls_token_id
    assert processor.truncated([long, "a red circle"]) == 1


def test_save_load_round_trip_and_the_zero_shot_pipeline(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded, reloaded_processor = AutoModel.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is type(model) and not changed_weights(model, reloaded.state_dict())
    assert reloaded.text_head.decoder.weight is reloaded.qformer.word_embeddings.weight  # ITG's decoder stays tied
    inputs = batch(reloaded_processor, CAPTIONS[:2])
    assert torch.equal(reloaded(**inputs).logits_per_image, model(**inputs).logits_per_image)

    image, labels = random_image(5, (32, 32)), ["a red circle", "a blue square", "a yellow star"]
    scores = pipeline("zero-shot-image-classification", model=str(tmp_path))(image, candidate_labels=labels)
    with torch.no_grad():
        text = processor(images=[image], text=[f"This is a photo of {label}." for label in labels],
                         return_tensors="pt")
        expected = model(**text).logits_per_image[0].softmax(-1)
    got = {entry["label"]: entry["score"] for entry in scores}
    assert [got[label] for label in labels] == pytest.approx(expected.tolist(), abs=reorder_bound(expected))
