"""Prompt files under a hostile tester: bad seeds and duplicate (prompt, seed) pairs (issue 9, items 5 and 7)."""
from __future__ import annotations

import pytest

from probes.prompts.sets import PromptSpec, load_prompts, split_indices


def csv_file(tmp_path, body: str):
    path = tmp_path / "p.csv"
    path.write_text("prompt,seed\n" + body)
    return path


@pytest.mark.parametrize("seed", ["abc", "1.5", "-3", ""])
def test_a_bad_seed_names_the_file_line_column_and_value(tmp_path, seed):
    path = csv_file(tmp_path, f"a cat,1\na dog,{seed}\n")
    with pytest.raises(ValueError, match=rf"(?s){path.name}, line 3.*column 'seed'.*{seed!r}.*whole number"):
        load_prompts(PromptSpec(source=str(path)))


def test_the_bad_seed_of_a_multiline_prompt_names_its_own_line(tmp_path):
    path = csv_file(tmp_path, '"a cat\non two lines",1\nb,x\n')
    with pytest.raises(ValueError, match=r"line 4"):
        load_prompts(PromptSpec(source=str(path)))


def test_duplicate_prompt_seed_pairs_are_rejected_with_their_lines(tmp_path):
    """The same (prompt, seed) is the same image: in two splits it would leak train into test."""
    path = csv_file(tmp_path, "a cat,1\na dog,2\nA  cat,1\na dog,3\n")
    with pytest.raises(ValueError, match=r"(?s)same image.*'a cat'.*seed 1.*lines 2 and 4.*[Rr]emove"):
        load_prompts(PromptSpec(source=str(path), test_fraction=0.5))


def test_same_prompt_with_other_seeds_is_fine(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a cat\na cat\na cat\na cat\n")        # text files: seed_base + line number
    recs = load_prompts(PromptSpec(source=str(text), test_fraction=0.25, val_fraction=0.0))
    assert len({r.seed for r in recs}) == 4 and sum(map(len, split_indices(recs).values())) == 4
