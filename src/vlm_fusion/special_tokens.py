"""The special tokens a family adds to its LM's tokenizer (`<image>`; Flamingo's `<|endofchunk|>`), shared by the
processors, which add them, and the models composed from pretrained parts, which take their ids."""

from transformers.tokenization_utils_base import AddedToken


def add_special_token(tokenizer, token: str) -> int:
    """Add `token` to `tokenizer` as a special token unless it is there already; return its id."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken(token, normalized=False, special=True)]},
                                     replace_extra_special_tokens=False)  # `<video>` beside `<image>`, not over it
    return tokenizer.convert_tokens_to_ids(token)


def add_flamingo_tokens(tokenizer, image_token="<image>", end_of_chunk_token="<|endofchunk|>") -> tuple[int, int]:
    """Add OpenFlamingo's special tokens in its order (`<|endofchunk|>`, `<image>`, then `<PAD>` if the tokenizer has
    no pad token), so ids match checkpoints trained with it; return `(media_token_id, end_of_chunk_token_id)`."""
    end_of_chunk_id = add_special_token(tokenizer, end_of_chunk_token)
    media_id = add_special_token(tokenizer, image_token)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    return media_id, end_of_chunk_id
