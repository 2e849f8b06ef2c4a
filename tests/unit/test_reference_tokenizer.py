"""The reference's tokenisation (transformers 4.22's slow CLIP tokenizer without ftfy), and how many
of the 617 reference prompts it tokenises differently from the installed transformers.

The check is written from the steps the reference ran, in plain Python (BERT's BasicTokenizer as
transformers still ships it, CLIP's word pattern with ``regex``, CLIP's BPE over the merge ranks),
independently of the ``tokenizers`` components :func:`use_reference_tokenisation_` configures.
"""
from __future__ import annotations

import csv
import functools

import regex

from probes.diffusion.tokenizer import (
    CLIP_PATTERN,
    _vocab_and_merges,
    bpe_vocab_path,
    offline_clip_tokenizer,
    reference_clip_tokenizer,
    tokenisation_differences,
)
from tests.conftest import reference_dir


@functools.lru_cache(maxsize=1)
def _slow_parts():
    from transformers.models.bert.tokenization_bert_legacy import BasicTokenizer

    vocab, merges = _vocab_and_merges(str(bpe_vocab_path()))
    ranks = {m: i for i, m in enumerate(merges)}
    return BasicTokenizer(do_lower_case=True), vocab, ranks, _byte_encoder()


def _byte_encoder() -> dict[int, str]:
    """GPT-2/CLIP's byte -> character map: printable bytes map to themselves, the others to 256+."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + k) for k, b in enumerate(others)}}


def _bpe(word: str, ranks: dict) -> list[str]:
    """CLIP's BPE: the last symbol carries ``</w>``; merge the lowest-ranked pair until none is left."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = {(a, b) for a, b in zip(parts, parts[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        out, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                out.append(parts[i] + parts[i + 1])
                i += 2
            else:
                out.append(parts[i])
                i += 1
        parts = out
    return parts


def slow_reference_ids(text: str) -> list[int]:
    """Token ids as transformers 4.22's CLIPTokenizer computed them without ftfy (untruncated)."""
    basic, vocab, ranks, byte_chars = _slow_parts()
    cleaned = " ".join(basic.tokenize(text))
    ids = [vocab["<|startoftext|>"]]
    for piece in regex.findall(CLIP_PATTERN, cleaned, regex.IGNORECASE):
        word = "".join(byte_chars[b] for b in piece.encode("utf-8"))
        ids += [vocab[t] for t in _bpe(word, ranks)]
    return ids + [vocab["<|endoftext|>"]]


def reference_prompts() -> list[str]:
    folder = reference_dir("chen2023")
    prompts = []
    for name in ("train_split_prompts_seeds.csv", "test_split_prompts_seeds.csv"):
        with open(folder / name, encoding="utf-8", newline="") as f:
            prompts += [row["prompts"] for row in csv.DictReader(f)]
    return prompts


def test_reference_tokenisation_splits_punctuation_and_strips_accents():
    ref, default = reference_clip_tokenizer(), offline_clip_tokenizer()
    assert ref("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ref.tokenize("women's") == ["women</w>", "'</w>", "s</w>"]
    assert default.tokenize("women's") == ["women</w>", "'s</w>"]
    assert ref.tokenize("café") == default.tokenize("cafe")         # accents stripped, as BasicTokenizer did
    assert ref.tokenize("...") == [".</w>"] * 3 and default.tokenize("...") == ["...</w>"]
    for text in ["Elle Fanning at Variety's Power", "a “quoted” naïve Ünïcode—dash (x)(y)", "日本の 猫\tcat\u200b",
                 "R&D: 100% [draft] #1 x''y"]:
        assert ref(text).input_ids == slow_reference_ids(text), text


def test_reference_tokenisation_matches_the_slow_path_on_all_617_prompts():
    prompts = reference_prompts()
    assert len(prompts) == 617
    ref = reference_clip_tokenizer()
    got = ref(prompts).input_ids
    mismatched = [p for p, ids in zip(prompts, got) if ids != slow_reference_ids(p)]
    assert mismatched == []


def test_how_many_reference_prompts_tokenise_differently():
    """The number the README cites: 99 of 617 prompts give other token ids, as the model sees them
    (padded and truncated to 77), and the same 99 untruncated."""
    prompts = reference_prompts()
    differ = tokenisation_differences(prompts)
    assert len(differ) == 99
    assert tokenisation_differences(prompts, max_length=None) == differ
    assert any("'s" in prompts[i] for i in differ)
