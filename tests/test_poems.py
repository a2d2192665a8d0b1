"""The reversal-poem task: phrasings, normalisation, corpus lookup, both protocols and the evaluation."""
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llada_app import poems
from llada_app.backends import TorchDenoiser
from llada_app.data import followup_question, load_sonnets, question
from llada_app.loading import BUNDLED_MODELS, LoadedModel, ModelCard, load_model
from llada_app.modeling import LLaDAModelLM
from llada_app.poems import (Decoding, PoemCorpus, StaleEvaluation, completion_batch, completion_canvas, evaluate,
                             format_table, line_pairs, normalise, stored_evaluation, store_evaluation)
from llada_app.tokenization import decode_answer

from conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent


def test_question_phrasings():
    line = "From fairest creatures we desire increase,"
    assert question(line, "next") == f'What is the next line after "{line}"?'
    assert question(line, "previous") == f'What is the line before "{line}"?'
    assert len({question(line, "next", v) for v in range(8)}) > 1
    assert followup_question("next") == "And the line after that?"
    with pytest.raises(ValueError):
        question(line, "sideways")
    assert poems.ask("床前明月光，", "next") == "床前明月光的下一句是什么？直接输出句子即可。"


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


def test_line_pairs_limit_spreads_over_the_split():
    sonnets = load_sonnets()[:2]
    assert len(line_pairs(sonnets)) == 26
    picked = line_pairs(sonnets, 4)
    assert len(picked) == 4 and picked[0][0] == sonnets[0].lines[0] and picked[-1][0] in sonnets[1].lines


def test_line_lengths_of_a_split(tiny_tokenizer):
    corpus = PoemCorpus(load_sonnets(), 30)
    n = [len(tiny_tokenizer(line, add_special_tokens=False)["input_ids"])
         for s in corpus.split("train") for line in s.lines]
    assert corpus.line_lengths(tiny_tokenizer) == range(min(n), max(n) + 1)


# ---------------------------------------------------------------------------------- the completion canvas

def _loaded(model, tokenizer, name="tiny"):
    return LoadedModel(model.eval(), tokenizer, ModelCard.build(name, tokenizer, model.config))


@pytest.fixture(scope="module")
def tiny_mdm(tiny_model, tiny_tokenizer):
    return _loaded(tiny_model, tiny_tokenizer)


@pytest.fixture(scope="module")
def tiny_arm(tiny_tokenizer):
    torch.manual_seed(2)
    return _loaded(LLaDAModelLM(tiny_config(tiny_tokenizer, causal=True)), tiny_tokenizer, "tiny-arm")


def test_completion_canvas_layout(tiny_tokenizer, tiny_mdm):
    tok, ids = tiny_tokenizer, tiny_mdm.ids
    line = "From fairest creatures we desire increase,"
    given, newline = tok(line, add_special_tokens=False)["input_ids"], tok("\n", add_special_tokens=False)["input_ids"]
    assert completion_canvas(tok, ids, line, "next", 3) == [ids.eos, *given, *newline, *[ids.mask] * 3, ids.eos]
    assert completion_canvas(tok, ids, line, "previous", 2) == [ids.eos, ids.mask, ids.mask, *newline, *given, ids.eos]
    canvases, attn = completion_batch(tok, ids, [line, "Shall I"], "previous", [4, 2])
    # shortest gap first, row k * B + b; right padding never attended
    assert canvases.shape[0] == 4 and (canvases[:2] == ids.mask).sum(1).tolist() == [2, 2]
    assert (canvases[2:] == ids.mask).sum(1).tolist() == [4, 4]
    assert attn.sum(1).tolist() == [len(completion_canvas(tok, ids, t, "previous", L))
                                    for L in (2, 4) for t in (line, "Shall I")]


def test_completion_fixes_the_given_line_and_searches_the_gap(tiny_mdm):
    """Every step: the tokens outside the gap are the canvas's own (never proposed), only MASK slots get
    revealed; every gap length is a candidate, and the kept answer is the most confident one."""
    tok, ids = tiny_mdm.tokenizer, tiny_mdm.ids
    line, lengths = "That thereby beauty's rose might never die,", range(3, 7)
    steps = list(poems.completion_steps(TorchDenoiser(tiny_mdm.model), tok, ids, [line], "previous",
                                        Decoding(lengths=lengths, likelihood_samples=0)))
    assert steps[-1].done and steps[-1].nfe == max(lengths)  # candidates side by side: the longest one's passes
    candidates = [completion_canvas(tok, ids, line, "previous", L) for L in lengths]
    for step in steps:
        canvas = step.canvas[0].tolist()
        assert canvas in [c + [ids.pad] * (len(step.canvas[0]) - len(c)) for c in candidates]
        row, slots = step.ids[0].tolist(), [c == ids.mask for c in canvas]
        assert [t for t, s in zip(row, slots) if not s] == [c for c, s in zip(canvas, slots) if not s]
        assert not any(r and not s for r, s in zip(step.revealed[0, 1:].tolist(), slots[1:]))
    # the kept candidate has the highest mean log-confidence of its revealed tokens
    from llada_app.generation import candidate_steps

    scores = []
    for L in lengths:
        canvases, attn = completion_batch(tok, ids, [line], "previous", [L])
        run = list(candidate_steps(TorchDenoiser(tiny_mdm.model), canvases, attn, 1,
                                   poems.completion_config(canvases.shape[1]), prompt_length=1, mask_id=ids.mask,
                                   eos_id=ids.eos, eot_id=ids.eot))
        logc = [float(s.confidence[0][s.revealed[0]].log().sum()) for s in run[:-1]]
        scores.append((sum(logc) / L, L))
    assert (steps[-1].canvas[0] == ids.mask).sum().item() == max(scores, key=lambda s: s[0])[1]


def _top(conf: list[float], top: int) -> list[int]:
    """Indices of the `top` highest (ties: the earlier; 0: all), as a search picks what it re-scores."""
    order = sorted(range(len(conf)), key=lambda i: (-conf[i], i))
    return order[:top] if top else order


@pytest.mark.parametrize("top", [0, 2])
def test_completion_keeps_confidence_plus_the_likelihood_of_the_answer_text(tiny_mdm, top):
    """With likelihood samples the kept candidate maximises its mean log-confidence + the mean ELBO per
    token of its answer text, both recomputed here from one decoding per gap length, among the `top`
    most confident gap lengths of each line (0: all of them)."""
    from llada_app.generation import candidate_steps

    tok, ids, d = tiny_mdm.tokenizer, tiny_mdm.ids, TorchDenoiser(tiny_mdm.model)
    lines, lengths = ["That thereby beauty's rose might never die,", "Shall I compare thee"], range(3, 7)
    for direction in poems.DIRECTIONS:
        kept = list(poems.completion_steps(d, tok, ids, lines, direction,
                                           Decoding(lengths=lengths, likelihood_samples=8, rescore_top=top)))[-1]
        answers, conf, rows = [], [], []
        for L in lengths:
            one, one_attn = completion_batch(tok, ids, lines, direction, [L])
            run = list(candidate_steps(d, one, one_attn, 1, poems.completion_config(one.shape[1]), prompt_length=1,
                                       mask_id=ids.mask, eos_id=ids.eos, eot_id=ids.eot))
            for b, line in enumerate(lines):
                conf.append(float(sum(s.confidence[b][s.revealed[b]].log().sum() for s in run[:-1]) / L))
                answers.append(poems.gap_text(tok, ids, run[-1].ids[b].tolist(), one[b].tolist(), line))
                rows.append(run[-1].ids[b].tolist())
        likelihood = poems.answer_likelihood(d, tok, ids, lines * len(lengths), answers, direction, 8)
        score = (torch.tensor(conf) + likelihood).view(len(lengths), len(lines))
        for b, line in enumerate(lines):
            ks = _top(conf[b::len(lines)], top)
            best = max(ks, key=lambda k: (float(score[k, b]), -k)) * len(lines) + b
            got = kept.ids[b].tolist()
            assert got[:len(rows[best])] == rows[best] and set(got[len(rows[best]):]) <= {ids.pad}


@pytest.mark.parametrize("top", [0, 2])
def test_chat_search_keeps_confidence_plus_the_likelihood_of_the_answer(tiny_mdm, top, monkeypatch):
    """The chat protocol's length search: the kept length maximises the mean log-confidence + the mean ELBO per
    token of its answer slots (the prompt before them, the stop token after), both recomputed here from one
    decoding per length, each row alone, among the `top` most confident lengths (0: all); without samples
    it is the plain length search."""
    from llada_app.generation import GenerationConfig, length_search_steps, pad_prompts
    from llada_app.likelihood import gap_log_likelihood
    from llada_app.tokenization import chat_prompt_ids

    tok, ids, d = tiny_mdm.tokenizer, tiny_mdm.ids, TorchDenoiser(tiny_mdm.model)
    kw = dict(mask_id=ids.mask, eos_id=ids.eos, eot_id=ids.eot)
    lines = ["From fairest creatures we desire increase,", "Shall I compare thee"]
    x, attn = pad_prompts([chat_prompt_ids(tok, [{"role": "user", "content": question(line, "next")}])
                           for line in lines], ids.pad)  # [2, P], the shorter prompt left-padded
    assert attn is not None and not attn.all()
    config, lengths, P = GenerationConfig(gen_length=8, block_length=8, steps=8), range(2, 6), x.shape[1]
    import llada_app.likelihood

    scored, real = [], llada_app.likelihood.gap_log_likelihood

    def spy(denoiser, rows, slots, attention_mask, **kw):  # what the re-scoring asks the likelihood
        scored.append((rows, slots, attention_mask))
        return real(denoiser, rows, slots, attention_mask, **kw)

    monkeypatch.setattr(llada_app.likelihood, "gap_log_likelihood", spy)
    kept = list(poems.chat_steps(d, tok, ids, x, attn, config,
                                 Decoding(lengths=lengths, likelihood_samples=8, rescore_top=top), lines))[-1]
    monkeypatch.undo()
    (rows, slots, row_attn), = scored
    assert len(rows) == len(lines) * (top or len(lengths))  # each question's `top` candidates, once each
    for row, n, a in zip(rows, slots.sum(1).tolist(), row_attn):  # each row's own length and prompt padding
        b = next(b for b in range(len(lines)) if torch.equal(row[:P], x[b]))
        assert n in lengths and (row[P + n] == ids.eot) and torch.equal(a[:P], attn[b])
    for b in range(len(lines)):
        scores, rows, confs = [], [], []
        for L in lengths:
            run = list(length_search_steps(d, x[b:b + 1], attn[b:b + 1], config, [L], **kw))
            conf = float(sum(s.confidence[0][s.revealed[0]].log().sum() for s in run[:-1])) / L
            row = run[-1].ids[0]
            slots = torch.zeros_like(row, dtype=torch.bool)
            slots[P:P + L] = True
            full = torch.cat([attn[b], torch.ones(config.gen_length, dtype=torch.long)])
            elbo = float(gap_log_likelihood(d, row[None], slots[None], full[None], mask_id=ids.mask, mc_num=8, seed=0))
            empty = int(row[P]) in (ids.eos, ids.eot)  # the answer stops at once: never kept
            copy = normalise(decode_answer(tok, row[P:P + L].tolist(), ids)) == normalise(lines[b])  # nor is this
            scores.append(-math.inf if empty or copy else conf + elbo / L)
            rows.append(row)
            confs.append(conf)
        picks = _top(confs, top)
        if all(scores[k] == -math.inf for k in picks):  # every answer ruled out: the most confident
            want = picks[0]
        else:
            want = max(picks, key=lambda k: (scores[k], -k))
        assert torch.equal(kept.ids[b], rows[want])
    plain = list(length_search_steps(d, x, attn, config, lengths, **kw))[-1]
    unscored = Decoding(lengths=lengths, likelihood_samples=0)
    assert torch.equal(list(poems.chat_steps(d, tok, ids, x, attn, config, unscored, lines))[-1].ids, plain.ids)
    for bad in ("likelihood_samples", "rescore_top"):
        with pytest.raises(ValueError, match=f"{bad} must be >= 0"):
            Decoding(lengths=lengths, **{bad: -1})
    with pytest.raises(ValueError, match="needs candidate lengths"):
        poems.chat_steps(d, tok, ids, x, attn, config, Decoding())
    with pytest.raises(ValueError, match="one line per prompt"):
        poems.chat_steps(d, tok, ids, x, attn, config, unscored, lines[:1])


@pytest.mark.parametrize("protocol", poems.PROTOCOLS)
def test_searches_never_keep_a_copy_of_the_given_line(monkeypatch, protocol):
    """The bundled models copy a given line into their answer now and then; the neighbour of a line is never
    the line itself, so both searches rule such an answer out and keep the right line here. SFT sonnets,
    previous line: the base's completion and the chat model's question each copy the line without the rule."""
    folder, given, right = {"completion": ("sonnets-mdm-base", "In thee thy summer, ere thou be distill'd:",
                                           "Then let not winter's ragged hand deface,"),
                            "chat": ("sonnets-mdm", "Will be a tatter'd weed of small worth held:",
                                     "Thy youth's proud livery so gazed on now,")}[protocol]
    mdm = load_model(BUNDLED_MODELS / folder, device="cpu")
    decoding = Decoding.for_model(mdm.card, PoemCorpus.for_card(mdm.card), mdm.tokenizer)
    answer = poems.Answerer(mdm, decoding)

    def ask():
        if protocol == "chat":
            return answer.chat([[{"role": "user", "content": question(given, "previous")}]], [given])[0]
        return answer.complete([given], "previous")[0]

    assert ask() == right
    assert poems.repeats([given, given], [given.upper(), right]).tolist() == [True, False]
    monkeypatch.setattr(poems, "repeats", lambda lines, answers: torch.zeros(len(answers), dtype=torch.bool))
    assert normalise(ask()) == normalise(given)  # the rule is what keeps the right line


def test_chat_search_with_the_likelihood_keeps_lines_the_confidence_alone_misses():
    """The bundled chat model, held-out sonnets: for two questions the most confident length decodes a wrong
    line (the line after the right one; another sonnet's line) and the likelihood re-scoring keeps the right
    one, a previous line among them; where the confidence alone keeps an empty answer (its slots filled with
    the end of text), the search with the likelihood keeps a line (empty answers are ruled out)."""
    mdm = load_model(BUNDLED_MODELS / "sonnets-mdm", device="cpu")
    corpus = PoemCorpus.for_card(mdm.card)
    decoding = Decoding.for_model(mdm.card, corpus, mdm.tokenizer)
    pairs = poems.line_pairs(corpus.split("heldout"))
    cases = [("Lord of my love, to whom in vassalage", "next", "To thee I send this written embassage,"),
             ("I sigh the lack of many a thing I sought,", "previous", "Not from the stars do I my judgement pluck;"),
             ("From sullen earth, sings hymns at heaven's gate,;", "next", "")]
    conversations = [[{"role": "user", "content": question(given, direction)}] for given, direction, _ in cases]
    given = [given for given, *_ in cases]
    confident = poems.Answerer(mdm, replace(decoding, likelihood_samples=0)).chat(conversations, given)
    kept = poems.Answerer(mdm, decoding).chat(conversations, given)
    assert confident == [alone for *_, alone in cases]
    for (given, direction, _), answer in zip(cases[:2], kept[:2]):
        right = next(b if direction == "next" else a for a, b in pairs if (a if direction == "next" else b) == given)
        assert answer == right
    assert kept[2] != ""


def test_answer_likelihood_reads_the_answer_in_its_own_canvas(tiny_mdm):
    """A one-token answer: every sample masks it, so the estimate (the answer's tokens alone, no boundary) is
    log p(token) in the canvas whose gap is that one token, exactly; an empty answer scores -inf."""
    tok, ids, d = tiny_mdm.tokenizer, tiny_mdm.ids, TorchDenoiser(tiny_mdm.model)
    line = "Shall I compare thee"
    word = next(w for w in ("I", "a", "O", "A") if len(tok(w, add_special_tokens=False)["input_ids"]) == 1)
    (t,) = tok(word, add_special_tokens=False)["input_ids"]
    got = poems.answer_likelihood(d, tok, ids, [line, line, line], [word, "", word], "previous", 4, boundary_slots=0)
    canvas = torch.tensor([completion_canvas(tok, ids, line, "previous", 1)])  # EOS [MASK] sep line EOS
    with torch.no_grad():
        logp = torch.log_softmax(tiny_mdm.model(canvas).logits[0, 1], -1)
    assert got[0] == pytest.approx(float(logp[t]), abs=1e-5) and got[2] == got[0]
    assert got[1] == float("-inf")


def test_answer_likelihood_counts_the_line_boundary_as_one_more_token(tiny_mdm):
    """With boundary slots the score is (ELBO of the n answer tokens + the boundary's log-probability) / (n + 1);
    a one-token answer: (log p(token) + boundary) / 2 exactly."""
    tok, ids, d = tiny_mdm.tokenizer, tiny_mdm.ids, TorchDenoiser(tiny_mdm.model)
    line = "Shall I compare thee"
    word = next(w for w in ("I", "a", "O", "A") if len(tok(w, add_special_tokens=False)["input_ids"]) == 1)
    answers = [word, "thou art more lovely", ""]
    n = torch.tensor([len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers[:2]])
    for direction in poems.DIRECTIONS:
        alone = poems.answer_likelihood(d, tok, ids, [line] * 3, answers, direction, 4, boundary_slots=0)
        both = poems.answer_likelihood(d, tok, ids, [line] * 3, answers, direction, 4, boundary_slots=2)
        edge = poems.line_boundary(d, tok, ids, [line] * 2, [tok(a, add_special_tokens=False)["input_ids"]
                                                             for a in answers[:2]], direction, 2)
        assert torch.allclose(both[:2], (alone[:2] * n + edge) / (n + 1), atol=1e-5)
        assert both[2] == alone[2] == float("-inf")
    assert poems.Decoding().to_json()["boundary_slots"] == poems.BOUNDARY_SLOTS > 0  # part of a stored key
    with pytest.raises(ValueError, match="boundary_slots must be >= 0"):
        Decoding(boundary_slots=-1)


def test_line_boundary_reads_the_mask_touching_the_answer(tiny_mdm):
    """Previous: [MASK x k] answer sep line EOS, read at column k - 1; next: EOS line sep answer [MASK x k],
    read at the first mask; the log of the summed probabilities of EOS and the separator. Rows of other
    lengths in the same batch (padded on either side) change nothing."""
    tok, ids, d = tiny_mdm.tokenizer, tiny_mdm.ids, TorchDenoiser(tiny_mdm.model)
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    lines = ["Shall I compare thee", "Thou art more lovely and more temperate"]
    answers = [enc("to a summer's day"), enc("Rough winds")]
    ends = [ids.eos, *enc("\n")]
    for direction, k in (("previous", 3), ("next", 3), ("next", 1)):
        got = poems.line_boundary(d, tok, ids, lines, answers, direction, k)
        for r, (line, answer) in enumerate(zip(lines, answers)):
            if direction == "previous":
                row, col = [ids.mask] * k + answer + enc("\n") + enc(line) + [ids.eos], k - 1
            else:
                row = [ids.eos] + enc(line) + enc("\n") + answer + [ids.mask] * k
                col = len(row) - k
            with torch.no_grad():
                logp = torch.log_softmax(tiny_mdm.model(torch.tensor([row])).logits[0, col].float(), -1)
            assert float(got[r]) == pytest.approx(float(logp[ends].logsumexp(0)), abs=1e-4)
            alone = poems.line_boundary(d, tok, ids, [line], [answer], direction, k)
            assert float(alone[0]) == pytest.approx(float(got[r]), abs=1e-4)
    with pytest.raises(ValueError, match="non-empty answer"):
        poems.line_boundary(d, tok, ids, lines, [answers[0], []], "next")


def test_arm_completion_of_previous_cannot_see_the_line_after_its_gap(tiny_arm):
    """The causal twin reads the canvas left to right: for "previous" its answer is the same whatever
    line follows the gap; for "next" the given line comes first and changes the answer."""
    answer = poems.Answerer(tiny_arm, Decoding(lengths=range(4, 9)))
    lines = ["From fairest creatures we desire increase,", "When forty winters shall besiege thy brow,"]
    prev = answer.complete(lines, "previous")
    assert prev[0] == prev[1]
    canvas = completion_canvas(tiny_arm.tokenizer, tiny_arm.ids, lines[0], "previous", 8)
    assert poems.arm_completion_prompt(canvas, tiny_arm.ids.mask) == ([tiny_arm.ids.eos], 8)
    # the causal model's logits over the gap do not change with the tokens after it
    other = completion_canvas(tiny_arm.tokenizer, tiny_arm.ids, lines[1], "previous", 8)
    n = min(len(canvas), len(other))
    a = tiny_arm.model(torch.tensor([canvas[:n]])).logits[0, :9]
    b = tiny_arm.model(torch.tensor([other[:n]])).logits[0, :9]
    assert torch.allclose(a, b, atol=1e-5)
    nxt = poems.Answerer(tiny_arm, Decoding(lengths=range(4, 9))).complete(lines, "next")
    assert len(nxt) == 2


# ---------------------------------------------------------------------------------- evaluation

class _Oracle:
    """Stands in for the Answerer: answers from the corpus (checks the scoring, not a model)."""

    def __init__(self, corpus, wrong_direction=None):
        self.corpus, self.wrong = corpus, wrong_direction

    def complete(self, lines, direction, progress=lambda f: None):
        out = ["" if direction == self.wrong else self.corpus.expected(line, direction).upper() for line in lines]
        progress(1.0)
        return out

    def chat(self, conversations, given, progress=lambda f: None):
        assert len(given) == len(conversations)
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
        progress(1.0)
        return out


@pytest.mark.parametrize("protocol", poems.PROTOCOLS)
def test_evaluate_scores_exact_matches(monkeypatch, tiny_mdm, protocol):
    corpus = PoemCorpus(load_sonnets(), 30)
    monkeypatch.setattr(poems, "Answerer", lambda *a, **k: _Oracle(corpus, wrong_direction="previous"))
    seen = []
    r = evaluate(tiny_mdm, corpus, "heldout", protocol, decoding=Decoding(), multiturn=True, progress=seen.append)
    assert (r.forward, r.reversal, r.n_pairs, r.protocol) == (1.0, 0.0, 65, protocol)
    assert seen == sorted(seen) and seen[-1] == 1.0
    if protocol == "chat":
        assert 0.4 < r.multiturn < 0.6  # forward chains right, backward chains wrong
    else:
        assert r.multiturn is None and r.n_followups == 0  # follow-ups are a chat question
    assert len(r.items) == 130 and sum(i["correct"] for i in r.items) == 65
    assert r.examples("previous") == [] and len(r.examples("next")) == 65
    assert f"| tiny [MDM] | {protocol} | heldout | 100.0 | 0.0 | 65 |" in format_table([r])


def test_answerer_runs_every_decoder(tiny_mdm, tiny_arm):
    line = "From fairest creatures we desire increase,"
    conv = [[{"role": "user", "content": question(line, "next")}]] * 2
    for loaded in (tiny_mdm, tiny_arm):
        for decoding in (Decoding(gen_length=8), Decoding(gen_length=8, lengths=range(2, 5))):
            a = poems.Answerer(loaded, decoding)
            answers = a.chat(conv, [line] * 2)
            assert len(answers) == 2 and answers[0] == answers[1]  # greedy decoding of the same prompt
            seen = []
            assert poems.Answerer(loaded, decoding, batch_size=1).chat(conv, [line] * 2, seen.append) == answers
            assert seen == [0.5, 1.0]  # after each batch
    with pytest.raises(ValueError, match="not divisible by block length"):
        poems.Answerer(tiny_mdm, Decoding(gen_length=8, block_length=3))


def test_stored_evaluation_is_refused_for_other_weights_or_settings(tmp_path, tiny_mdm, tiny_tokenizer):
    corpus = PoemCorpus(load_sonnets(), 30)
    decoding = Decoding(gen_length=8, lengths=range(2, 4))
    results = [evaluate(tiny_mdm, corpus, "heldout", "completion", decoding=decoding, limit=2)]
    key = poems.evaluation_key(tiny_mdm, decoding, {"heldout": 2})
    store_evaluation(tmp_path, key, results)
    back = stored_evaluation(tmp_path, key)
    assert [r.forward for r in back] == [results[0].forward] and back[0].items == results[0].items
    torch.manual_seed(11)
    other = _loaded(LLaDAModelLM(tiny_config(tiny_tokenizer)), tiny_tokenizer)
    with pytest.raises(StaleEvaluation, match="other weights"):
        stored_evaluation(tmp_path, poems.evaluation_key(other, decoding, {"heldout": 2}))
    with pytest.raises(StaleEvaluation, match="other settings .*decoding"):
        stored_evaluation(tmp_path, poems.evaluation_key(tiny_mdm, replace(decoding, gen_length=16), {"heldout": 2}))
    (tmp_path / poems.EVALUATION).write_text("{not json")
    with pytest.raises(StaleEvaluation, match="unreadable"):
        stored_evaluation(tmp_path, key)
    assert stored_evaluation(tmp_path / "none", key) is None


def _eval_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "llada_app.poems", "eval", *args, "--json", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("protocol", poems.PROTOCOLS)
def test_eval_cli_reproduces_the_stored_evaluation_of_the_bundled_models(protocol):
    """`poems eval --protocol P --json`: one row per model, forward and reversal, and every answer the
    same as the one stored in the model folder (which the page and README quote) for that question;
    on the completion canvas the base MDM answers held-out previous lines and its twin cannot."""
    mdm_name = "sonnets-mdm-base" if protocol == "completion" else "sonnets-mdm"
    rows = _eval_cli("--model", str(BUNDLED_MODELS / mdm_name), "--model", str(BUNDLED_MODELS / "sonnets-arm"),
                     "--protocol", protocol, "--limit", "8")
    assert [(r["kind"], r["protocol"], r["n_pairs"]) for r in rows] == [("MDM", protocol, 8), ("ARM", protocol, 8)]
    for row in rows:
        stored = json.loads((BUNDLED_MODELS / row["model"] / poems.EVALUATION).read_text())["results"]
        (result,) = [r for r in stored if r["protocol"] == protocol and r["split"] == "heldout"]
        answers = {(i["given"], i["direction"]): i["answer"] for i in result["items"]}
        assert len(row["items"]) == 16
        assert [i["answer"] for i in row["items"]] == [answers[i["given"], i["direction"]] for i in row["items"]]
    mdm, arm = rows
    assert arm["forward"] >= 0.75 and arm["reversal"] <= 0.125
    if protocol == "completion":
        assert mdm["reversal"] >= 0.5 > arm["reversal"]


def test_eval_cli_errors(capsys):
    with pytest.raises(SystemExit):
        poems.main(["eval", "--model", str(BUNDLED_MODELS / "sonnets-mdm"), "--block-length", "5", "--limit", "1",
                    "--device", "cpu", "--protocol", "chat"])
    assert "not divisible by block length 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        poems.main(["eval", "--model", str(BUNDLED_MODELS / "sonnets-mdm"), "--lengths", "9:4"])
    assert "answer lengths need 1 <= MIN <= MAX" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        poems.main(["eval", "--model", "/no/such/folder"])
    assert "model folder not found" in capsys.readouterr().err


def test_length_search_answers_the_bundled_mdm_in_whole_lines():
    """Fixed-length decoding lets the bundled MDM commit its end-of-answer padding before the content;
    decoding every line length of the SFT sonnets and keeping the most confident does better (here on 20
    SFT-sonnet pairs per direction, both directions counted)."""
    mdm = load_model(BUNDLED_MODELS / "sonnets-mdm", device="cpu")
    corpus = PoemCorpus.for_card(mdm.card)
    search = Decoding.for_model(mdm.card, corpus, mdm.tokenizer)
    assert search.lengths == corpus.line_lengths(mdm.tokenizer)
    search = replace(search, likelihood_samples=0)  # the length search alone (its likelihood: tested above)
    plain = evaluate(mdm, corpus, "train", "chat", decoding=replace(search, lengths=None), limit=20)
    searched = evaluate(mdm, corpus, "train", "chat", decoding=search, limit=20)
    assert searched.forward + searched.reversal > plain.forward + plain.reversal, (searched, plain)
