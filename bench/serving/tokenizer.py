"""A tokenizer of our own for dummy-weight model folders: a small word-level vocabulary.

SGLang's loader opens a tokenizer even when the prompts are token ids (one_batch draws random ids),
so every model folder gets this one: `tokenizer.json` in the Hugging Face `tokenizers` format (a
WordLevel model, whitespace pre-tokenizer, three special tokens, 512 tokens in all) and a
`tokenizer_config.json` naming PreTrainedTokenizerFast. The model's vocab_size may be larger than
the tokenizer's: ids past it are never decoded by the benchmark.
"""

from __future__ import annotations

# Special tokens; model configs point pad/bos/eos at these ids.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_WORDS = 509  # plain words after the special tokens: 512 tokens in all


def tokenizer_files() -> dict[str, dict]:
    """tokenizer.json (a Hugging Face `tokenizers` WordLevel model) and tokenizer_config.json."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab |= {f"w{i}": len(SPECIAL_TOKENS) + i for i in range(_WORDS)}
    added = [
        {
            "id": i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, token in enumerate(SPECIAL_TOKENS)
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": SPECIAL_TOKENS[PAD_ID]},
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": SPECIAL_TOKENS[PAD_ID],
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[PAD_ID],
        "model_max_length": 131072,
    }
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": tokenizer_config}
