"""Tokenizers built locally over the toy vocabulary: a CLIP-style BPE and a T5-style unigram.

Both are trained with the `tokenizers` library so they behave like the real ones (lowercasing,
`</w>` end-of-word BPE for CLIP, sentencepiece-style `▁` pieces and `</s>` for T5), and each toy
word comes out as exactly one token (checked in the tests).
"""

from __future__ import annotations

import json
import string

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer, T5TokenizerFast

from .configs import MAX_TOKENS
from .data import vocabulary

CLIP_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def _corpus() -> list[str]:
    # every word several times, so BPE merges each into a single symbol
    return [" ".join(vocabulary())] * 8


def build_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges turn every toy word into one `word</w>` token."""
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=CLIP_SPECIAL, end_of_word_suffix="</w>",
                                  show_progress=False)
    bpe.train_from_iterator(_corpus(), trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    return CLIPTokenizer(vocab=bpe.get_vocab(), merges=merges, model_max_length=MAX_TOKENS)


def build_t5_tokenizer() -> T5TokenizerFast:
    """A T5-style unigram tokenizer (`▁word` pieces, `</s>` appended, `<pad>` id 0).

    The unigram vocabulary is written directly: every toy word as one `▁word` piece with a high
    log-probability, plus single characters with a low one so any other text still tokenizes.
    """
    words = vocabulary()
    chars = sorted({c for w in words for c in w} | set(string.ascii_letters + string.digits))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in words] + [(c, -8.0) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=MAX_TOKENS)
