"""The reversal-poem task: phrasings, normalisation, corpus lookup and the evaluation plumbing."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llada_app.data import load_sonnets
from llada_app.poems import (ChatAnswerer, PoemCorpus, _pairs, evaluate, followup_question, format_table, infill_accuracy,
                             normalise, question)

ROOT = Path(__file__).resolve().parent.parent


def test_question_phrasings():
    line = "From fairest creatures we desire increase,"
    assert question(line, "next") == f'What is the next line after "{line}"?'
    assert question(line, "previous") == f'What is the line before "{line}"?'
    assert len({question(line, "next", v) for v in range(8)}) > 1
    assert followup_question("next") == "And the line after that?"
    with pytest.raises(ValueError):
        question(line, "sideways")


def test_normalise_ignores_case_space_and_punctuation():
    assert normalise("  That thereby Beauty's rose,  might never die! ") == normalise("that thereby beautys rose might never die")
    assert normalise("a b") != normalise("a c")
    assert normalise("床前明月光，") == normalise("床前明月光") != normalise("疑是地上霜")


def test_corpus_lookup_and_held_out_flag():
    corpus = PoemCorpus(load_sonnets(), 30)
    info = corpus.lookup("that thereby beauty's rose might never die")
    assert (info.sonnet, info.index, info.held_out) == (1, 1, False)
    assert info.previous == "From fairest creatures we desire increase,"
    assert corpus.expected(info.text, "next") == "But as the riper should by time decease,"
    held = corpus.lookup(load_sonnets()[27].lines[5])
    assert held.sonnet == 28 and held.held_out and held.in_training
    assert not corpus.lookup(load_sonnets()[99].lines[0]).in_training
    assert corpus.lookup("not a line of any sonnet") is None
    assert corpus.expected(load_sonnets()[0].lines[0], "previous") is None
    assert [s.number for s in corpus.split("heldout")] == [26, 27, 28, 29, 30]


def test_pairs_limit_spreads_over_the_split():
    sonnets = load_sonnets()[:2]
    assert len(_pairs(sonnets, None)) == 26
    picked = _pairs(sonnets, 4)
    assert len(picked) == 4 and picked[0][0] == sonnets[0].lines[0] and picked[-1][0] in sonnets[1].lines


class _Oracle:
    """Stands in for a model: answers questions from the corpus (checks the scoring, not a model)."""

    def __init__(self, corpus, wrong_direction=None):
        self.corpus, self.wrong = corpus, wrong_direction

    def __call__(self, conversations, progress=lambda f: None):
        out = []
        for conv in conversations:
            line, direction = None, None
            for m in conv:
                if m["role"] == "user" and '"' in m["content"]:
                    line = m["content"].split('"')[1]
                    direction = "next" if "next" in m["content"] else "previous"
                elif m["role"] == "assistant":
                    line = m["content"]
            out.append("" if direction == self.wrong else self.corpus.expected(line, direction).upper())
            progress(len(out) / len(conversations))
        return out


def test_evaluate_scores_exact_matches(monkeypatch, tiny_model, tiny_tokenizer):
    corpus = PoemCorpus(load_sonnets(), 30)
    import llada_app.poems as poems

    monkeypatch.setattr(poems, "ChatAnswerer", lambda *a, **k: _Oracle(corpus, wrong_direction="previous"))
    seen = []
    r = evaluate(None, None, None, corpus, "heldout", limit=None, progress=seen.append)
    assert (r.forward, r.reversal, r.n_pairs) == (1.0, 0.0, 65)
    assert seen == sorted(seen) and seen[0] > 0 and seen[-1] == 1.0 and 0.5 in seen  # directions, then follow-ups
    assert 0.4 < r.multiturn < 0.6  # forward chains right, backward chains wrong
    assert "| model (heldout) | 100.0 | 0.0 |" in format_table([r])


def test_chat_answerer_runs_both_decoders(tiny_model, tiny_tokenizer):
    from llada_app.loading import special_ids
    from llada_app.modeling import LLaDAModelLM

    ids = special_ids(tiny_tokenizer, tiny_model.config)
    conv = [[{"role": "user", "content": question("From fairest creatures we desire increase,", "next")}]] * 2
    mdm = ChatAnswerer(tiny_model, tiny_tokenizer, ids, gen_length=8)(conv)
    causal = LLaDAModelLM(type(tiny_model.config)(**{**tiny_model.config.to_dict(), "causal": True})).eval()
    arm = ChatAnswerer(causal, tiny_tokenizer, ids, gen_length=8)(conv)
    assert len(mdm) == len(arm) == 2 and all(isinstance(a, str) for a in mdm + arm)
    assert mdm[0] == mdm[1]  # greedy decoding of the same prompt
    seen = []
    assert ChatAnswerer(tiny_model, tiny_tokenizer, ids, gen_length=8, batch_size=1)(conv, seen.append) == mdm
    assert seen == [0.5, 1.0]  # after each batch


def test_chat_answerer_semi_autoregressive_blocks(tiny_model, tiny_tokenizer, capsys):
    from llada_app.loading import special_ids
    from llada_app.poems import main

    ids = special_ids(tiny_tokenizer, tiny_model.config)
    conv = [[{"role": "user", "content": question("From fairest creatures we desire increase,", "next")}]]
    one = ChatAnswerer(tiny_model, tiny_tokenizer, ids, gen_length=8)
    blocks = ChatAnswerer(tiny_model, tiny_tokenizer, ids, gen_length=8, block_length=4)
    assert (one.config.num_blocks, blocks.config.num_blocks, blocks.config.steps) == (1, 2, 8)
    assert isinstance(blocks(conv)[0], str)
    with pytest.raises(ValueError, match="not divisible by block length"):
        ChatAnswerer(tiny_model, tiny_tokenizer, ids, gen_length=8, block_length=3)
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(ROOT / "assets/models/sonnets-mdm"), "--block-length", "5", "--limit", "1",
              "--device", "cpu"])
    assert "not divisible by block length 5" in capsys.readouterr().err


def test_eval_cli_on_a_micro_model(tmp_path):
    from llada_app.train import parse_args, train

    cfg, _ = parse_args(["--preset", "micro", "--output-dir", str(tmp_path), "--no-progress", "--pretrain-steps", "5",
                         "--sft-steps", "0"])
    train(cfg)
    proc = subprocess.run([sys.executable, "-m", "llada_app.poems", "eval", "--model", str(tmp_path), "--limit", "3",
                           "--json", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)[0]
    assert result["n_pairs"] == 3 and 0 <= result["forward"] <= 1 and "[MDM]" in result["model"]


def test_infill_probe_reads_what_the_bundled_mdm_knows():
    """The knowledge probe fills a held-out line next to its neighbour: the bundled MDM knows most of
    them (80.0 / 72.3 on all 65 pairs), while the ARM is not probed."""
    from llada_app.loading import BUNDLED_MODELS, load_model

    corpus = PoemCorpus(load_sonnets(), 30)
    mdm = load_model(BUNDLED_MODELS / "sonnets-mdm", device="cpu")
    pairs = _pairs(corpus.split("heldout"), 12)
    fwd, rev = infill_accuracy(mdm.model, mdm.tokenizer, mdm.ids, pairs)
    assert fwd >= 0.5 and rev >= 0.5, (fwd, rev)
    shuffled = [(a, b) for (a, _), (_, b) in zip(pairs, pairs[1:] + pairs[:1])]  # wrong neighbours
    assert infill_accuracy(mdm.model, mdm.tokenizer, mdm.ids, shuffled)[0] < fwd
    arm = load_model(BUNDLED_MODELS / "sonnets-arm", device="cpu")
    r = evaluate(arm.model, arm.tokenizer, arm.ids, corpus, "heldout", limit=2, multiturn=False, infill=True)
    assert r.infill_forward is None and "| — | 2 |" in format_table([r])  # no follow-ups were asked
    probed = dataclasses.replace(r, model="mdm", infill_forward=fwd, infill_reversal=rev)
    table = format_table([probed, r])
    assert "Infill fwd / rev" in table and f"{100 * fwd:.1f} / {100 * rev:.1f} |" in table and table.endswith("| — |")


def test_length_search_ranges(tiny_tokenizer, capsys):
    from llada_app.generation import parse_lengths
    from llada_app.poems import main, sft_line_lengths

    assert parse_lengths("3:5") == range(3, 6) and parse_lengths(" ") is None
    for bad in ("5:3", "0:4", "x", "4", "a:b"):
        with pytest.raises(ValueError, match="answer lengths"):
            parse_lengths(bad)
    corpus = PoemCorpus(load_sonnets(), 30)
    lengths = [len(tiny_tokenizer(line, add_special_tokens=False)["input_ids"])
               for s in corpus.split("train") for line in s.lines]
    assert sft_line_lengths(corpus, tiny_tokenizer) == range(min(lengths), max(lengths) + 1)
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(ROOT / "assets/models/sonnets-mdm"), "--length-search", "9:4", "--limit", "1"])
    assert "answer lengths need 1 <= MIN <= MAX" in capsys.readouterr().err


def test_length_search_answers_the_bundled_mdm_in_whole_lines():
    """Fixed-length decoding lets the bundled MDM commit its end-of-answer padding before the content;
    decoding every line length of the SFT sonnets and keeping the most confident does better on the
    held-out forward questions (README: 40.0 against 20.0 on all 65 pairs)."""
    from llada_app.loading import BUNDLED_MODELS, load_model
    from llada_app.poems import sft_line_lengths

    mdm = load_model(BUNDLED_MODELS / "sonnets-mdm", device="cpu")
    corpus = PoemCorpus.for_model(BUNDLED_MODELS / "sonnets-mdm")
    lengths = sft_line_lengths(corpus, mdm.tokenizer)
    plain = evaluate(mdm.model, mdm.tokenizer, mdm.ids, corpus, "heldout", limit=16, multiturn=False)
    search = evaluate(mdm.model, mdm.tokenizer, mdm.ids, corpus, "heldout", limit=16, multiturn=False,
                      length_search=lengths)
    assert search.forward > plain.forward, (search.forward, plain.forward)
