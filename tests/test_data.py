"""Corpus cleaning, the held-out split, pre-training windows and the synthetic chat data."""
import numpy as np
import pytest

from llada_app.data import (clean_gutenberg, format_sonnets, load_sonnets, pretraining_window,
                            roman_to_int, sft_example, split_corpus)
from llada_app.train import BatchMaker, TrainConfig, build_tokenizer

RAW = """THE SONNETS

by William Shakespeare

  I

From fairest creatures we desire increase,
That thereby beauty's rose might never die,
  But as the riper should by time decease,  

II

When forty winters shall besiege thy brow,
And dig deep trenches in thy beauty's field,
"""


def test_roman_numerals():
    assert [roman_to_int(r) for r in ("I", "IV", "IX", "XIV", "XLIX", "XC", "CXXVIII", "CLIV")] == \
        [1, 4, 9, 14, 49, 90, 128, 154]


def test_clean_gutenberg_numbers_sonnets_and_strips_indents(tmp_path):
    sonnets = clean_gutenberg(RAW)
    assert [s.number for s in sonnets] == [1, 2]
    assert sonnets[0].lines[2] == "But as the riper should by time decease,"
    path = tmp_path / "s.txt"
    path.write_text(format_sonnets(sonnets))
    assert load_sonnets(path) == sonnets
    with pytest.raises(ValueError, match="unexpected numbering"):
        clean_gutenberg(RAW.replace("II\n", "V\n"))


def test_bundled_corpus_is_complete():
    sonnets = load_sonnets()
    assert len(sonnets) == 154 and [s.number for s in sonnets] == list(range(1, 155))
    assert sum(len(s.lines) for s in sonnets) == 2155
    assert sonnets[0].lines[0] == "From fairest creatures we desire increase,"
    assert sonnets[127].lines[0].startswith("How oft when thou, my music")  # mislabelled in the source


def test_split_holds_out_the_last_sixth_at_least_five():
    sonnets = load_sonnets()
    train, held = split_corpus(sonnets, 30)
    assert [s.number for s in held] == [26, 27, 28, 29, 30] and len(train) == 25
    train, held = split_corpus(sonnets, 48)
    assert len(held) == 8 and held[-1].number == 48
    with pytest.raises(ValueError):
        split_corpus(sonnets, 5)


def test_pretraining_windows_are_consecutive_lines():
    sonnet = load_sonnets()[0]
    rng = np.random.default_rng(0)
    lengths = set()
    for _ in range(300):
        lines = pretraining_window(sonnet, rng).split("\n")
        if lines[0] == "Sonnet 1":
            lines = lines[1:]
        lengths.add(len(lines))
        start = sonnet.lines.index(lines[0])
        assert list(sonnet.lines[start:start + len(lines)]) == lines
    assert 1 in lengths and 2 in lengths and 14 in lengths


def test_sft_answers_are_right():
    sonnet = load_sonnets()[2]
    rng = np.random.default_rng(1)
    kinds = set()
    for _ in range(200):
        ex = sft_example(sonnet, rng)
        kinds.add(ex.kind)
        q = ex.messages[0]["content"]
        asked = [line for line in sonnet.lines if f'"{line}"' in q]
        if ex.kind in ("next", "previous"):
            i = sonnet.lines.index(asked[0])
            assert ex.answer == sonnet.lines[i + (1 if ex.kind == "next" else -1)]
        elif ex.kind == "followup":
            i = sonnet.lines.index(asked[0])
            turns = (len(ex.messages) + 1) // 2
            step = 1 if ex.answer in sonnet.lines[i:] else -1
            assert ex.answer == sonnet.lines[i + step * turns]
            for k, m in enumerate(ex.messages[1::2], start=1):  # earlier answers are the lines in between
                assert m["content"] == sonnet.lines[i + step * k]
        elif ex.kind == "first":
            assert ex.answer == sonnet.lines[0]
        else:
            assert ex.answer == "Sonnet 3."
    assert kinds == {"next", "previous", "first", "which", "followup"}


def test_held_out_sonnets_never_appear_in_sft_batches():
    sonnets = load_sonnets()
    cfg = TrainConfig(n_sonnets=30, vocab_size=512, pretrain_steps=0, sft_steps=50, replay=0.0, batch_size=16)
    train, held = split_corpus(sonnets, 30)
    tok = build_tokenizer(cfg, sonnets[:30])
    maker = BatchMaker(cfg, tok, sonnets[:30], train)
    held_lines = {line for s in held for line in s.lines}
    seen_train = False
    for step in range(20):
        batch = maker(step)
        assert batch.kind == "sft"
        text = tok.decode(batch.input_ids.flatten().tolist())
        assert not any(line in text for line in held_lines)
        seen_train |= any(line in text for s in train for line in s.lines)
    assert seen_train


def test_batches_are_a_pure_function_of_seed_and_step():
    sonnets = load_sonnets()
    cfg = TrainConfig(n_sonnets=30, vocab_size=512, pretrain_steps=5, sft_steps=5, batch_size=4)
    tok = build_tokenizer(cfg, sonnets[:30])
    a = BatchMaker(cfg, tok, sonnets[:30], split_corpus(sonnets, 30)[0])
    b = BatchMaker(cfg, tok, sonnets[:30], split_corpus(sonnets, 30)[0])
    for step in (0, 3, 7):
        assert a(step).input_ids.equal(b(step).input_ids)
    assert not a(1).input_ids.equal(a(2).input_ids)
    assert not a(1, rank=0).input_ids.equal(a(1, rank=1).input_ids)
