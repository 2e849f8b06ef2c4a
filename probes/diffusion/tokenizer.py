"""A real CLIP tokenizer built offline from the BPE vocabulary that ships in open-clip-torch.

Random-weight models still need SD's exact tokenisation (prompt length, padding with
``<|endoftext|>``), and the Hub is unreachable on many machines, so the vocabulary is rebuilt
from ``open_clip/bpe_simple_vocab_16e6.txt.gz`` the way CLIP defines it.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

from transformers import CLIPTokenizer

#: CLIP's merge list: lines 1..48894 of the BPE file (line 0 is a version header)
NUM_MERGES = 49152 - 256 - 2


def bpe_vocab_path() -> Path:
    """Locate the BPE file without importing open_clip (its ``__init__`` imports torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "open-clip-torch is needed for the offline CLIP tokenizer (it ships the BPE vocabulary): "
            "pip install open-clip-torch")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"CLIP BPE vocabulary not found at {path}; reinstall open-clip-torch")
    return path


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2's reversible byte -> printable-character table, in vocabulary order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


@functools.lru_cache(maxsize=2)
def _vocab_and_merges(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    byte_chars = _bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges  # type: ignore[return-value]


def offline_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """CLIP ViT-L/14's tokenizer (49,408 entries), padded with ``<|endoftext|>`` as SD v1 does."""
    vocab, merges = _vocab_and_merges(str(bpe_vocab_path()))
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length,
                         pad_token="<|endoftext|>")


# -- the reference's tokenisation ------------------------------------------------------------------
#: CLIP's word pattern (its ``simple_tokenizer``), applied after the basic cleaning
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def use_reference_tokenisation_(tokenizer: CLIPTokenizer) -> CLIPTokenizer:
    """Make ``tokenizer`` split text as the reference's did, in place; returns it.

    The reference ran transformers 4.22.2 without ftfy installed (its ``environment.yml``). Its
    slow ``CLIPTokenizer`` then fell back to BERT's ``BasicTokenizer(do_lower_case=True)``: drop
    control characters and map whitespace to spaces, pad CJK characters with spaces, lowercase,
    **strip accents** (NFD, drop non-spacing marks) and **split off every punctuation character**
    (so ``variety's`` became ``variety ' s``, not ``variety 's``); then CLIP's word pattern and
    byte-level BPE. transformers 5 has only the ``tokenizers``-backed CLIP tokenizer, which
    normalises with NFC + whitespace + lowercase and keeps accents and punctuation runs, so 99 of
    the 617 reference prompts give other token ids (``tests/unit/test_reference_tokenizer.py``).

    The same steps exist as ``tokenizers`` components: ``BertNormalizer`` is BasicTokenizer's
    cleaning, CJK padding, accent stripping and lowercasing, ``BertPreTokenizer`` its whitespace
    and punctuation split. ftfy plays no part, whether it is installed or not (the reference's
    ftfy branch, ``fix_text`` + whitespace clean + lowercase, is not what it ran).
    """
    from tokenizers import Regex, normalizers, pre_tokenizers

    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.BertPreTokenizer(),
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.init_kwargs["tokenisation"] = "reference"   # saved with the tokenizer: say what it is
    return tokenizer


def reference_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """:func:`offline_clip_tokenizer` with the reference's tokenisation."""
    return use_reference_tokenisation_(offline_clip_tokenizer(max_length))


def token_ids(tokenizer: CLIPTokenizer, prompts: list[str], max_length: int = 77) -> list[list[int]]:
    """The ids the text encoder sees for each prompt: padded and truncated as SD's pipeline does."""
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True).input_ids


def tokenisation_differences(prompts: list[str], max_length: int | None = 77) -> list[int]:
    """Positions of the prompts whose token ids differ between the installed transformers' CLIP
    tokenizer and the reference's (``max_length=None``: untruncated ids)."""
    default, reference = offline_clip_tokenizer(), reference_clip_tokenizer()
    if max_length is None:
        a, b = default(prompts).input_ids, reference(prompts).input_ids
    else:
        a, b = token_ids(default, prompts, max_length), token_ids(reference, prompts, max_length)
    return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
