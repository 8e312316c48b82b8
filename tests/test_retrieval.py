"""`vlm-fusion evaluate retrieval`: LAVIS's metrics against a brute-force recomputation, the ITM re-ranking, a fake
model whose ITM knows the answer, every kind of bad input in one line, and the command end to end on a tiny model."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import assert_reordered
from vlm_fusion.evaluation import retrieval
from vlm_fusion.evaluation.retrieval import RetrievalSet
from vlm_fusion_cli import main

LAVIS_KEYS = ["txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean",
              "agg_metrics"]


# ---- the metrics --------------------------------------------------------------------------------------------------
def lavis_metrics(scores_i2t, scores_t2i, txt2img, kind="stable"):
    """`RetrievalTask._report_metrics` of LAVIS 1.0.2 (lavis/tasks/retrieval.py), its arithmetic as written there, so
    that equality means bit-equal JSON. LAVIS calls `np.argsort(score)[::-1]` with numpy's default sort, whose order
    among equal scores is the implementation's; `kind="stable"` fixes it (reversed: the later index first), as
    vlm-fusion does."""
    img2txt = {i: [t for t, image in enumerate(txt2img) if image == i] for i in range(len(scores_i2t))}
    # Images->Text
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score, kind=kind)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    tr1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    tr5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    tr10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    # Text->Images
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score, kind=kind)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    ir5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    ir10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    tr_mean = (tr1 + tr5 + tr10) / 3
    ir_mean = (ir1 + ir5 + ir10) / 3
    r_mean = (tr_mean + ir_mean) / 2
    agg_metrics = (tr1 + tr5 + tr10) / 3
    return {"txt_r1": tr1, "txt_r5": tr5, "txt_r10": tr10, "txt_r_mean": tr_mean, "img_r1": ir1, "img_r5": ir5,
            "img_r10": ir10, "img_r_mean": ir_mean, "r_mean": r_mean, "agg_metrics": agg_metrics}


def random_problem(seed, ties):
    """12-20 images with 1-4 captions each, the captions shuffled (an image's captions are not side by side); with
    `ties`, scores from {0, 1, 2} and a -100 block, as re-ranking leaves them."""
    rng = np.random.default_rng(seed)
    N = int(rng.integers(12, 21))
    txt2img = rng.permutation(np.repeat(np.arange(N), rng.integers(1, 5, N)))  # (M,)
    M = len(txt2img)
    if ties:
        scores_i2t = rng.integers(0, 3, (N, M)).astype(np.float32)
        scores_t2i = rng.integers(0, 3, (M, N)).astype(np.float32)
        scores_i2t[:, : M // 2] = -100.0
        scores_t2i[: M // 2, : N // 2] = -100.0
    else:
        scores_i2t, scores_t2i = rng.normal(size=(N, M)), rng.normal(size=(M, N))
    return scores_i2t, scores_t2i, txt2img


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_a_brute_force_recomputation(seed, ties):
    scores_i2t, scores_t2i, txt2img = random_problem(seed, ties)
    ours = retrieval.retrieval_metrics(scores_i2t, scores_t2i, txt2img)
    assert list(ours) == LAVIS_KEYS
    assert ours == lavis_metrics(scores_i2t, scores_t2i, txt2img)  # to the last bit
    if not ties:  # no equal scores: exactly LAVIS's numbers, with its own default sort
        assert ours == lavis_metrics(scores_i2t, scores_t2i, txt2img, kind="quicksort")
    assert 0 < ours["txt_r10"] < 100 or 0 < ours["img_r10"] < 100  # the problems are not trivially all-or-nothing


def test_metrics_are_lavis_numbers_to_the_last_bit_where_the_roundings_differ():
    """7 images with a caption each; image i's caption ranks i-th, caption j's image j-th (so R@1 is 1 in 7, R@5 5 in
    7). 100 * mean(ranks < 1) is 14.285714285714285; LAVIS's 100.0 * count / len is 14.285714285714286, and the means
    built on them differ in the last bit too: a JSON compared with LAVIS's by equality needs LAVIS's arithmetic."""
    N = 7
    scores_i2t = np.tile(-np.arange(N, dtype=float), (N, 1))  # (N, N): every row ranks column j j-th
    scores_t2i = scores_i2t.copy()
    txt2img = np.arange(N)
    ours = retrieval.retrieval_metrics(scores_i2t, scores_t2i, txt2img)
    assert retrieval.ranks(scores_i2t, txt2img[:, None]).tolist() == list(range(N))
    assert ours == lavis_metrics(scores_i2t, scores_t2i, txt2img)
    assert ours["txt_r1"] == 14.285714285714286 != 100.0 * float(np.mean(np.arange(N) < 1))
    assert json.dumps(ours) == json.dumps(lavis_metrics(scores_i2t, scores_t2i, txt2img))


def test_equal_scores_rank_the_later_candidate_first():
    """All scores equal: the order is 2, 1, 0 (captions) and 1, 0 (images), as `np.argsort(..., kind="stable")[::-1]`
    gives it. Image 0 (captions 0, 1) ranks caption 1 second; image 1 (caption 2) ranks it first."""
    metrics = retrieval.retrieval_metrics(np.zeros((2, 3)), np.zeros((3, 2)), [0, 0, 1])
    assert (metrics["txt_r1"], metrics["txt_r5"]) == (50.0, 100.0)
    assert metrics["img_r1"] == pytest.approx(100 / 3) and metrics["img_r5"] == 100.0
    assert retrieval.ranks(np.array([[5.0, 7.0, 7.0, 7.0, 1.0]]), [[1]]).tolist() == [2]  # 3 and 2 first


def test_metric_means_are_lavis_means():
    # image 0 finds its caption first; image 1 finds caption 1 (not 2) first; caption 2 puts image 0 first
    scores_i2t = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]])
    scores_t2i = np.array([[0.9, 0.2], [0.1, 0.8], [0.6, 0.4]])
    metrics = retrieval.retrieval_metrics(scores_i2t, scores_t2i, [0, 1, 1])
    assert metrics["txt_r1"] == metrics["txt_r_mean"] == metrics["agg_metrics"] == 100.0
    assert metrics["img_r1"] == pytest.approx(200 / 3) and metrics["img_r5"] == metrics["img_r10"] == 100.0
    assert metrics["img_r_mean"] == pytest.approx((200 / 3 + 200) / 3)
    assert metrics["r_mean"] == pytest.approx((100 + metrics["img_r_mean"]) / 2)


def test_metrics_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="scores_i2t is 2x3"):
        retrieval.retrieval_metrics(np.zeros((2, 3)), np.zeros((2, 3)), [0, 0, 1])
    with pytest.raises(ValueError, match=r"images without a caption: \[1\]"):
        retrieval.retrieval_metrics(np.zeros((2, 3)), np.zeros((3, 2)), [0, 0, 0])


# ---- ITC and the re-ranking -------------------------------------------------------------------------------------
def test_itc_is_the_best_query_in_chunks():
    g = torch.Generator().manual_seed(0)
    image_feats, text_feats = torch.randn(5, 3, 4, generator=g), torch.randn(7, 4, generator=g)
    expected = torch.tensor([[max(float(q @ t) for q in image) for t in text_feats] for image in image_feats])
    assert_reordered(retrieval.itc_similarity(image_feats, text_feats, chunk=2), expected)


class MatrixITM:
    """ITM logits read from a matrix; records the pairs asked for, batch by batch."""

    def __init__(self, table):
        self.table, self.batches = table, []

    def __call__(self, rows, columns):
        self.batches.append(list(zip(rows.tolist(), columns.tolist())))
        return self.table[rows, columns]


def test_rerank_with_every_candidate_sorts_by_itm_plus_itc():
    g = torch.Generator().manual_seed(1)
    sims, table = torch.rand(6, 9, generator=g), 5 * torch.randn(6, 9, generator=g)
    for k in (9, 1000):  # k capped at the number of candidates
        itm = MatrixITM(table)
        scores = retrieval.rerank(sims, k, itm, batch_size=4)
        assert torch.allclose(scores, sims + table)
        assert torch.equal(scores.argsort(dim=1, descending=True), (sims + table).argsort(dim=1, descending=True))
        assert [len(b) for b in itm.batches] == [4] * 13 + [2]  # 54 pairs, 4 at a time


def test_rerank_scores_only_the_top_k_by_itc():
    g = torch.Generator().manual_seed(2)
    sims, table = torch.rand(5, 8, generator=g), torch.randn(5, 8, generator=g)
    itm = MatrixITM(table)
    scores = retrieval.rerank(sims, 3, itm, batch_size=4)
    asked = [pair for batch in itm.batches for pair in batch]
    top = {(r, int(c)) for r in range(5) for c in sims[r].argsort(descending=True)[:3]}
    assert len(asked) == 15 and set(asked) == top and max(map(len, itm.batches)) <= 4
    for r in range(5):
        for c in range(8):
            expected = sims[r, c] + table[r, c] if (r, c) in top else torch.tensor(-100.0)
            assert torch.isclose(scores[r, c], expected)


# ---- the driver, on a fake model that follows the contract -------------------------------------------------------
class FakeProcessor:
    """Image i is a solid image of red 10 * i; the caption "image i caption v" is the ids [i, v]."""

    def __call__(self, images=None, text=None, return_tensors=None):
        if images is not None:
            ids = [np.asarray(image)[0, 0, 0] // 10 for image in images]
            return {"pixel_values": torch.tensor(ids, dtype=torch.float32)[:, None, None, None]}  # (B, 1, 1, 1)
        ids = [[int(word) for word in caption.split() if word.isdigit()] for caption in text]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), 2, dtype=torch.long)}


class FakeRetrievalModel(torch.nn.Module):
    """ITC misleads: the captions of image t are embedded as image t+1's first query, so by ITC alone every image
    and every caption is matched with a wrong one (R@1 = 0). ITM knows: logit 20 for the right pairs, 0 otherwise."""

    def __init__(self, num_images, num_queries=4, dim=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.queries = F.normalize(torch.randn(num_images, num_queries, dim, generator=g), dim=-1)  # (N, Q, E)
        self.weight = torch.nn.Parameter(torch.zeros(()))  # a device and dtype to read
        self.itm_batches = []

    def get_vision_embeddings(self, pixel_values):
        return pixel_values.flatten(1)[:, None, :].expand(-1, 3, -1)  # (B, V=3, D_v=1): the image id

    def get_image_features(self, vision_embeds):
        return self.queries[vision_embeds[:, 0, 0].long()]  # (B, Q, E)

    def get_text_features(self, input_ids, attention_mask):
        return self.queries[(input_ids[:, 0] + 1) % len(self.queries), 0]  # (B, E)

    def image_text_matching(self, vision_embeds, input_ids, attention_mask):
        self.itm_batches.append(len(input_ids))
        match = (vision_embeds[:, 0, 0].long() == input_ids[:, 0]).float()  # (P,)
        return torch.stack([torch.zeros_like(match), 20 * match], dim=1)  # (P, 2)


def fake_samples(num_images=6):
    """Image i has i % 3 + 1 captions, listed round-robin (not side by side)."""
    images = [Image.new("RGB", (4, 4), (10 * i, 0, 0)) for i in range(num_images)]
    pairs = [(i, v) for v in range(3) for i in range(num_images) if v <= i % 3]
    return RetrievalSet(images, [f"image {i} caption {v}" for i, v in pairs], [i for i, _ in pairs])


def test_itm_that_knows_the_pairs_lifts_r1_to_100():
    samples = fake_samples()
    N, M = len(samples.images), len(samples.texts)
    model = FakeRetrievalModel(N)
    itc_only = retrieval.evaluate(model, FakeProcessor(), samples, k=1, batch_size=4)  # re-ranking keeps ITC's top 1
    assert itc_only["txt_r1"] == itc_only["img_r1"] == 0.0
    model.itm_batches.clear()
    reranked = retrieval.evaluate(model, FakeProcessor(), samples, k=128, batch_size=4)
    assert all(reranked[key] == 100.0 for key in LAVIS_KEYS)
    assert sum(model.itm_batches) == N * M + M * N and max(model.itm_batches) <= 4  # k capped: every pair, both ways


def test_score_matrices_are_itm_plus_itc_of_the_top_k():
    samples = fake_samples()
    model = FakeRetrievalModel(len(samples.images))
    scores_i2t, scores_t2i = retrieval.score_matrices(model, FakeProcessor(), samples, k=3, batch_size=5)
    image_feats, text_feats = model.queries, model.queries[(torch.tensor(samples.txt2img) + 1) % 6, 0]
    sims = retrieval.itc_similarity(image_feats, text_feats)  # (N, M)
    itm = 20.0 * (torch.arange(6)[:, None] == torch.tensor(samples.txt2img)[None, :])  # (N, M)
    for scores, s, m in ((scores_i2t, sims, itm), (scores_t2i, sims.T, itm.T)):
        kept = scores > -100
        assert (kept.sum(1) == 3).all()
        assert torch.equal(kept, torch.zeros_like(kept).scatter_(1, s.topk(3, dim=1).indices, True))
        assert torch.allclose(scores[kept], (s + m)[kept])


# ---- the data -----------------------------------------------------------------------------------------------------
def write_images(folder, count):
    folder.mkdir(exist_ok=True)
    for i in range(count):
        Image.new("RGB", (8, 8), (40 * i, 255 - 40 * i, 90)).save(folder / f"{i}.png")
    return folder


def llava(sid, image, caption):
    row = {"id": sid, "conversations": [{"from": "human", "value": "<image>\ndescribe the image ."},
                                        {"from": "gpt", "value": caption}]}
    return {**row, "image": image} if image is not None else row


def test_an_image_in_several_samples_is_one_image_with_several_captions(tmp_path):
    images = write_images(tmp_path / "images", 3)
    rows = [llava("a", "0.png", " a red square \n"), llava("b", "1.png", "<image> a green one"),
            llava("c", "./0.png", "the red one again"), llava("d", "2.png", "a blue one")]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    samples = retrieval.read_samples(str(tmp_path / "data.json"), str(images))
    assert samples.images == [str(images / "0.png"), str(images / "1.png"), str(images / "2.png")]
    assert samples.texts == ["a red square", "a green one", "the red one again", "a blue one"]
    assert samples.txt2img == [0, 1, 0, 2]


def test_decoded_images_are_the_same_image_when_their_pixels_are():
    from vlm_fusion.training.data import Conversation

    def sample(sid, colour):
        return Conversation(sid, [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": sid}],
                            [Image.new("RGB", (4, 4), colour)])

    samples = retrieval.retrieval_set([sample("x", (1, 2, 3)), sample("y", (9, 9, 9)), sample("z", (1, 2, 3))])
    assert len(samples.images) == 2 and samples.txt2img == [0, 1, 0]


@pytest.fixture
def qformer_config(tmp_path):
    """A folder that passes the checkpoint-type check: the data errors come before any weights are read."""
    folder = tmp_path / "qformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": retrieval.MODEL_TYPE}))
    return folder


BAD_DATA = {
    "no image": ([llava("s0", "0.png", "a"), llava("s1", None, "b")], "sample s1: 0 images"),
    "no caption": ([llava("s0", "0.png", "a"), llava("s1", "1.png", " <image> \n")], "sample s1: no caption"),
    "one image": ([llava("s0", "0.png", "a"), llava("s1", "0.png", "b")], "holds 1 distinct image(s) (2 caption(s))"),
    "missing file": ([llava("s0", "0.png", "a"), llava("s1", "9.png", "b")], "sample s1: image file"),
    "two images": ([llava("s0", ["0.png", "1.png"], "a"), llava("s1", "1.png", "b")], "sample s0: 2 images"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_one_line_and_nothing_is_written(case, qformer_config, tmp_path, capsys):
    rows, message = BAD_DATA[case]
    images = write_images(tmp_path / "images", 2)
    (tmp_path / "data.json").write_text(json.dumps(rows))
    output = tmp_path / "out" / "results.json"
    for extra in ([], ["--output", str(output)]):
        assert main(["evaluate", "retrieval", "--model", str(qformer_config), "--data", str(tmp_path / "data.json"),
                         "--image-folder", str(images), *extra]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1
        assert captured.err.startswith("vlm-fusion: error: evaluate retrieval: ") and message in captured.err
    assert sorted(p.name for p in qformer_config.iterdir()) == ["config.json"] and not (tmp_path / "out").exists()


def test_a_generation_model_is_refused_in_one_line(tmp_path, capsys):
    images = write_images(tmp_path / "images", 2)
    (tmp_path / "data.json").write_text(json.dumps([llava("s0", "0.png", "a"), llava("s1", "1.png", "b")]))
    args = ["--data", str(tmp_path / "data.json"), "--image-folder", str(images), "--output", str(tmp_path / "r.json")]
    assert main(["evaluate", "retrieval", "--model", "demo:blip2", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a generation model (fusion_blip2)" in err
    assert "retrieval needs a stage-1 Q-Former checkpoint (fusion_blip2_qformer)" in err
    assert main(["evaluate", "retrieval", "--model", str(tmp_path / "nowhere"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no model folder {tmp_path / 'nowhere'}" in err
    assert not (tmp_path / "r.json").exists()


def test_the_command_needs_its_subcommand_and_a_positive_k(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "retrieval", "--model", "m", "--data", "d", "--k", "0"])
    assert exit_info.value.code == 2 and "must be at least 1" in capsys.readouterr().err


# ---- end to end, on a tiny real stage-1 model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from vlm_fusion.tools.tiny import tiny_qformer_retrieval

    path = tmp_path_factory.mktemp("qformer")
    torch.manual_seed(0)
    model, processor = tiny_qformer_retrieval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


CAPTIONS = [("0.png", "a red circle"), ("1.png", "the small blue square is left of the star"),
            ("0.png", "one red circle in the image"), ("2.png", "two yellow triangles"), ("3.png", "a green star"),
            ("2.png", "yellow")]  # 4 images, 6 captions of 3 to 11 tokens


@pytest.fixture(scope="module")
def caption_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    (root / "data.json").write_text(json.dumps([llava(f"s{n}", image, caption)
                                                for n, (image, caption) in enumerate(CAPTIONS)]))
    return root


def test_batched_scores_equal_one_pair_at_a_time(tiny_checkpoint, caption_data):
    """Images, captions and ITM pairs in batches (captions padded to the longest of all) score as each image, each
    unpadded caption and each pair alone: ITC the best query, ITM + ITC for every pair when k covers them all."""
    model, processor = retrieval.load(str(tiny_checkpoint))
    samples = retrieval.read_samples(str(caption_data / "data.json"), str(caption_data / "images"))
    scores_i2t, scores_t2i = retrieval.score_matrices(model, processor, samples, k=128, batch_size=4)
    expected = torch.empty(4, 6)
    with torch.no_grad():
        for i, path in enumerate(samples.images):
            pixel_values = processor(images=[Image.open(path)], return_tensors="pt")["pixel_values"]
            vision = model.get_vision_embeddings(pixel_values)  # (1, V, D_v)
            queries = model.get_image_features(vision_embeds=vision)[0]  # (Q, E)
            for j, caption in enumerate(samples.texts):
                tokens = processor(text=[caption], return_tensors="pt")
                itc = (queries @ model.get_text_features(**tokens)[0]).max()
                expected[i, j] = model.image_text_matching(vision_embeds=vision, **tokens)[0, 1] + itc
    assert_reordered(scores_i2t, expected)
    assert_reordered(scores_t2i, expected.T)
    assert expected.std() > 1e-3  # the random model tells the pairs apart


def test_evaluate_retrieval_end_to_end(tiny_checkpoint, caption_data, tmp_path, capsys):
    args = ["evaluate", "retrieval", "--model", str(tiny_checkpoint), "--data", str(caption_data / "data.json"),
            "--image-folder", str(caption_data / "images"), "--k", "3", "--batch-size", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    written = json.loads((tiny_checkpoint / "retrieval_results.json").read_text())
    assert list(written) == LAVIS_KEYS + ["setup"]
    assert written["setup"] == {"model": str(tiny_checkpoint), "data": str(caption_data / "data.json"), "images": 4,
                                "texts": 6, "k_test": 3}
    model, processor = retrieval.load(str(tiny_checkpoint))
    samples = retrieval.read_samples(str(caption_data / "data.json"), str(caption_data / "images"))
    expected = retrieval.evaluate(model, processor, samples, k=3, batch_size=5)
    assert {key: written[key] for key in LAVIS_KEYS} == pytest.approx(expected)
    assert "4 images, 6 captions" in out and "each image's top 3 captions and each caption's top 3 images" in out
    assert f"R@1 {written['txt_r1']:6.2f}" in out and f"r_mean {written['r_mean']:.2f}" in out
    assert f"written to {tiny_checkpoint / 'retrieval_results.json'}" in out
    assert written["txt_r10"] == written["img_r10"] == 100.0  # 4 images, 6 captions: everything is in the top 10
    output = tmp_path / "results" / "tiny.json"
    assert main([*args, "--k", "100", "--output", str(output)]) == 0
    assert "top 6 captions" in capsys.readouterr().out
    assert list(json.loads(output.read_text())) == LAVIS_KEYS + ["setup"]
