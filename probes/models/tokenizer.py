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
