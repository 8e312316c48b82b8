"""The demo's clips (`vlm_fusion.demo.clips`): reproducible from their seed, and each answer is what the frames show
(read back from the pixels, cell by cell) and what no single frame shows."""

import importlib.resources

import numpy as np
import pytest

from vlm_fusion.demo import clips, shapes

BACKGROUND = np.array((235, 235, 235))


def cells_seen(frame) -> dict:
    """`{(row, col): colour}` of the grid cells a shape is drawn in, read from the pixels: a cell holds a shape when
    enough of its pixels are not the background, and its colour is the nearest of the palette to their mean."""
    pixels = np.asarray(frame).astype(float)
    size = shapes.IMAGE_SIZE // shapes.GRID
    seen = {}
    for row in range(shapes.GRID):
        for col in range(shapes.GRID):
            cell = pixels[row * size:(row + 1) * size, col * size:(col + 1) * size].reshape(-1, 3)
            drawn = cell[np.abs(cell - BACKGROUND).sum(1) > 60]
            if len(drawn) > 20:
                mean = drawn.mean(0)
                seen[(row, col)] = min(shapes.COLOURS, key=lambda c: np.abs(np.array(shapes.COLOURS[c]) - mean).sum())
    return seen


def shapes_in(frame) -> dict:
    """`{(row, col): shape}` of a frame: each drawn cell's mask matched against the four shapes, each drawn alone where
    its geometry puts it given the mask's box (the best overlap)."""
    mask = np.abs(np.asarray(frame).astype(float) - BACKGROUND).sum(2) > 60
    size = shapes.IMAGE_SIZE // shapes.GRID
    found = {}
    for (row, col) in cells_seen(frame):
        cell = np.zeros_like(mask)
        cell[row * size:(row + 1) * size, col * size:(col + 1) * size] = True
        ys, xs = np.nonzero(mask & cell)
        half_width, top, cx = (xs.max() - xs.min() + 1) / 2, ys.min(), (xs.min() + xs.max() + 1) / 2
        # each shape's radius and centre from the mask's box, by the shape's geometry in `shapes.render`
        fits = {"circle": (half_width, top + half_width), "square": (half_width / 0.85, top + half_width),
                "triangle": (half_width, top + half_width), "star": (half_width / np.cos(np.pi / 10), None)}
        fits["star"] = (fits["star"][0], top + fits["star"][0])

        def overlap(shape):
            radius, cy = fits[shape]
            drawn = shapes.render([shapes.Item(shape, "red", row, col, radius, cx, cy)])
            alone = (np.abs(np.asarray(drawn).astype(float) - BACKGROUND).sum(2) > 60) & cell
            return (alone & mask).sum() / (alone | (mask & cell)).sum()

        found[(row, col)] = max(shapes.SHAPES, key=overlap)
    return found


def test_a_seed_reproduces_its_clips_and_another_does_not():
    first, again, other = clips.examples(7, 6), clips.examples(7, 6), clips.examples(8, 6)
    for (frames, *text), (frames_again, *text_again) in zip(first, again):
        assert text == text_again
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, frames_again))
    assert any(not np.array_equal(np.asarray(a[0][0]), np.asarray(b[0][0])) for a, b in zip(first, other))


def test_a_longer_clip_is_the_same_clip_whose_uniformly_sampled_frames_are_the_short_ones():
    """The 32-frame rows of the trade-off table read the same events recorded 4x slower."""
    from transformers.video_utils import default_sample_indices_fn, VideoMetadata

    for (short, *text), (long, *text_long) in zip(clips.examples(5, 6), clips.examples(5, 6, num_frames=32)):
        assert text == text_long and len(long) == 32
        picked = default_sample_indices_fn(VideoMetadata(total_num_frames=32), num_frames=clips.NUM_FRAMES)
        assert all(np.array_equal(np.asarray(long[i]), np.asarray(frame)) for i, frame in zip(picked, short))
    with pytest.raises(ValueError, match="multiple of 8"):
        clips.examples(5, 1, num_frames=12)


def test_clips_have_the_frames_and_size_of_the_task():
    for frames, kind, question, answer in clips.examples(3, 6):
        assert len(frames) == clips.NUM_FRAMES
        assert all(frame.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE) for frame in frames)
        assert kind in clips.TEMPORAL_TYPES
        assert set(question.split()) | set(answer.split()) <= set(shapes.VOCABULARY) | set(clips.VOCABULARY)


@pytest.mark.parametrize("kind", clips.TEMPORAL_TYPES)
def test_the_answer_is_what_the_frames_show_and_no_single_frame_shows(kind):
    for frames, _, question, answer in clips.examples(11, 60, kinds=(kind,)):
        seen = [cells_seen(frame) for frame in frames]
        if kind == "direction":
            colour = question.split()[4]  # which way does the <colour> <shape> move ?
            start = [cell for cell, c in seen[0].items() if c == colour]
            end = [cell for cell, c in seen[-1].items() if c == colour]
            assert len(start) == len(end) == 1
            step = (end[0][0] - start[0][0], end[0][1] - start[0][1])
            assert clips.DIRECTIONS[answer] == step
            # every frame shows the shape in one cell: which way it went is in no single frame
            assert all(sum(c == colour for c in frame.values()) == 1 for frame in seen)
        elif kind == "appears_last":
            first_shown = {}
            for index, frame in enumerate(seen):
                for cell in frame:
                    first_shown.setdefault(cell, index)
            assert len(set(first_shown.values())) == len(first_shown) >= 2  # one after another
            assert max(first_shown.values()) > 0
            last = max(first_shown, key=first_shown.get)
            assert answer == shapes_in(frames[-1])[last]
        else:  # blinks: the asked shape's cell goes empty, frame by frame, as many times as the answer says
            cells = set().union(*seen)
            runs = {cell: sum(cell not in seen[i] and cell in seen[i - 1] for i in range(1, len(seen))) for cell in cells}
            blinking = [cell for cell, count in runs.items() if count]
            assert len(blinking) == 1
            assert shapes.NUMBERS[runs[blinking[0]]] == answer
            assert blinking[0] in seen[0] and blinking[0] in seen[-1]


def test_an_unknown_question_type_is_refused_in_one_line():
    with pytest.raises(ValueError, match="unknown temporal question type 'speed'"):
        clips.sample_clip(np.random.default_rng(0), "speed")


def test_the_pixel_reader_reads_known_scenes():
    """The reader the answers are checked with, on still scenes whose shapes are known."""
    rng = np.random.default_rng(5)
    for _ in range(100):
        scene = shapes.sample_scene(rng)
        image = shapes.render(scene)
        assert cells_seen(image) == {(item.row, item.col): item.colour for item in scene}
        assert shapes_in(image) == {(item.row, item.col): item.shape for item in scene}


def test_the_blip2_style_text_stage_writes_each_frame_in_as_many_tokens_as_its_queries():
    """The BLIP-2-style LM reads a frame as its 16 query tokens: written as text for its clip-text stage, a frame is
    its nine cell words and then `FILLER`s, one token each, so that token k of a frame is where query k lands
    (`query_words_stage`)."""
    from transformers import AutoConfig, AutoTokenizer

    from vlm_fusion.demo import train

    path = str(importlib.resources.files("vlm_fusion.demo") / "checkpoints" / "blip2")
    queries, tokenizer = AutoConfig.from_pretrained(path).num_query_tokens, AutoTokenizer.from_pretrained(path)
    examples = clips.examples(13, 6, as_text=True)
    for (text, *_), (padded, *_) in zip(examples, train.with_fillers(examples, queries - shapes.GRID**2)):
        ids = tokenizer(padded, add_special_tokens=False)["input_ids"]
        assert len(ids) == clips.NUM_FRAMES * queries
        cells = tokenizer(text, add_special_tokens=False)["input_ids"]
        for frame in range(clips.NUM_FRAMES):
            tokens = ids[frame * queries:(frame + 1) * queries]
            assert tokens[:shapes.GRID**2] == cells[frame * shapes.GRID**2:(frame + 1) * shapes.GRID**2]
            assert set(tokens[shapes.GRID**2:]) == {tokenizer.convert_tokens_to_ids(train.FILLER)}


def test_a_clip_written_as_text_is_its_frames_words_frame_after_frame():
    """`as_text` (what the LLaVA-style LM learns time from before the video stage) gives the same clips and questions,
    each frame written as nine cell words, row by row: a word names the colour the pixels show in that cell, and an
    empty cell reads `empty`."""
    for (frames, *asked), (text, *asked_as_text) in zip(clips.examples(13, 30), clips.examples(13, 30, as_text=True)):
        assert asked == asked_as_text
        words = text.split()
        assert len(words) == clips.NUM_FRAMES * shapes.GRID**2
        for index, frame in enumerate(frames):
            seen = cells_seen(frame)
            for cell, word in enumerate(words[index * shapes.GRID**2:(index + 1) * shapes.GRID**2]):
                row, col = divmod(cell, shapes.GRID)
                if word == "empty":
                    assert (row, col) not in seen
                else:
                    colour, _, column = shapes.CELL_WORDS[word]
                    assert seen[(row, col)] == colour and column == shapes.COLUMNS[col]


@pytest.mark.parametrize("family", ["fusion_llava", "fusion_blip2", "fusion_flamingo"])
def test_each_shipped_checkpoint_was_trained_by_the_steps_the_script_runs_for_its_family(family):
    """`python -m vlm_fusion.demo.train` reproduces the shipped checkpoints: the video stage each card reports (its
    steps, its data's clips and image questions) and the stages before it are `family_steps(family)`'s."""
    import vlm_fusion
    from vlm_fusion.demo import train

    steps = train.family_steps(family)
    name = vlm_fusion.FAMILIES[family].name
    card = (importlib.resources.files("vlm_fusion.demo") / "checkpoints" / name / "README.md").read_text()
    video = card[card.index("## Training: the video stage"):card.index("## Evaluation")]
    count = 2 * train.clip_count(steps)  # clips and as many image questions
    assert f"| data | `clips_and_images_8_{count}.json`, {count:,} samples |" in video
    assert f"| schedule | {steps['video']} steps, cosine" in video
    before = {"clip_text": "on the clips written as text", "rows": "to name each patch's row",
              "words": "to write each image as the LM reads it"}
    route = train.takes_route(family, steps)
    ran = {"clip_text": family in train.CLIP_TEXT_FAMILIES or route, "rows": bool(steps["rows"]), "words": route}
    for key, words in before.items():
        assert (f"{steps[key]:,} steps of 64 {words}" in video) == ran[key], key
