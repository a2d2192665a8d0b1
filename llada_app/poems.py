"""The reversal-poem task: corpus lookup, the two protocols that ask it, and its evaluation.

Given a line of a poem, say the next line (forward) or the previous line (reversal); exact match
after normalising case, whitespace and punctuation. Two protocols ask the same thing:

- `completion`: no chat. The canvas is the text as pre-training showed it: EOS, the given line, a
  newline, a gap of masks, EOS (next) — or EOS, the gap, a newline, the given line, EOS (previous).
  The given line is fixed; the gap's length is searched (`generation.candidate_steps`; the kept
  length: confidence + the likelihood of its answer, `completion_steps`). A causal
  model decodes the same canvas left to right, so for "previous" its gap cannot see the line after it.
- `chat`: the question through the chat template (the LLaDA paper's form, for instruction models);
  a masked-diffusion model's answer length is searched and kept by the same two counts (`chat_steps`).

The sonnets held out of SFT were only ever read in reading order during pre-training, so an
autoregressive model can say their next line but not their previous one (the reversal curse).

CLI: `python -m llada_app.poems eval --model DIR [--model DIR] [--protocol completion|chat|both]
[--split heldout|train|both] [--limit N] [--json] [--store]`.
"""
from __future__ import annotations

import argparse
import json
import string
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .data import DEFAULT_N_SONNETS, SONNETS_FILE, Sonnet, followup_question, load_sonnets, question, split_corpus

PROTOCOLS = ("completion", "chat")
DIRECTIONS = ("next", "previous")
SPLITS = ("heldout", "train")
LIKELIHOOD_SAMPLES = 32  # MDM searches: masked samples of the ELBO that re-scores each candidate's answer text
BOUNDARY_SLOTS = 3  # completion: masks beyond an answer, where its likelihood reads the line boundary (`line_boundary`)
RESCORE_TOP = 8  # MDM searches: that likelihood re-scores each question's 8 most confident candidates only
GEN_LENGTH = 32  # chat: answer slots (= block length = steps) of a model that does not say its own
EVALUATION = "evaluation.json"  # the stored evaluation in a model folder (see `store_evaluation`)
# What the `Decoding` settings do not show: raised when the score that keeps a candidate changes, so that
# evaluations stored under the older rule are refused as stale. 2: the chat search's likelihood; 3: an
# answer that repeats the given line is ruled out (`repeats`).
SCORING_VERSION = 3

# Figures quoted from the LLaDA paper (Nie et al. 2025, Table 4: 496 Chinese couplets, chat protocol,
# forward / reversal exact match). Shown beside measured ones, always labelled as quoted.
PAPER_FIGURES = [("LLaDA-8B-Instruct", 51.8, 45.6), ("Qwen2.5-7B-Instruct", 75.9, 38.0), ("GPT-4o", 82.7, 34.3)]

# The LLaDA paper's prompts for Chinese couplets (chat protocol).
CHINESE_QUESTIONS = {"next": "{line}的下一句是什么？直接输出句子即可。",
                     "previous": "{line}的上一句是什么？直接输出句子即可。"}

_PUNCT = str.maketrans("", "", string.punctuation + "\u2018\u2019\u201c\u201d" + "，。！？、；：「」『』《》（）")


def normalise(text: str) -> str:
    """Case, whitespace and punctuation (Chinese included) do not count in exact match."""
    return " ".join(text.lower().translate(_PUNCT).split())


def repeats(lines: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """[N] bool: each answer is its given line again (exact match after `normalise`). The line before or
    after a line is never the line itself (no two adjacent lines of the sonnets are equal), yet a masked
    model that reads the given line beside its gap sometimes copies it: the searches rule such an answer
    out while another candidate says something else."""
    return torch.tensor([normalise(a) == normalise(line) for line, a in zip(lines, answers)], dtype=torch.bool)


def is_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def ask(line: str, direction: str) -> str:
    """The chat protocol's question: the canonical sonnet phrasing, or the paper's couplet prompt."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if is_chinese(line):
        return CHINESE_QUESTIONS[direction].format(line=given_line(line))
    return question(line, direction)


# ---------------------------------------------------------------------------------------------
# Corpus lookup

@dataclass(frozen=True)
class LineInfo:
    sonnet: int  # sonnet number
    index: int  # 0-based line index in the sonnet
    text: str
    previous: str | None  # None at the first line
    next: str | None  # None at the last line
    held_out: bool  # the sonnet was kept out of SFT (its text was only pre-trained on)
    in_training: bool  # the sonnet is in the model's training corpus at all


class PoemCorpus:
    """The sonnets plus the split a model was trained with."""

    def __init__(self, sonnets: list[Sonnet], n_sonnets: int):
        self.sonnets = sonnets
        self.n_sonnets = n_sonnets
        train, held = split_corpus(sonnets, n_sonnets)
        self.train_numbers = {s.number for s in train}
        self.heldout_numbers = {s.number for s in held}
        self._index: dict[str, tuple[Sonnet, int]] = {}
        for s in sonnets:
            for i, line in enumerate(s.lines):
                self._index.setdefault(normalise(line), (s, i))

    @classmethod
    def for_card(cls, card, sonnets_file: str | Path = SONNETS_FILE) -> "PoemCorpus":
        """The sonnets with the split a model trained here was trained with (the bundled split otherwise)."""
        return cls(load_sonnets(sonnets_file), card.n_sonnets or DEFAULT_N_SONNETS)

    def split(self, name: str) -> list[Sonnet]:
        numbers = {"heldout": self.heldout_numbers, "train": self.train_numbers}.get(name)
        if numbers is None:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return [s for s in self.sonnets if s.number in numbers]

    def lookup(self, line: str) -> LineInfo | None:
        """The sonnet line matching `line` (after normalisation), or None if it is not in the sonnets."""
        hit = self._index.get(normalise(line))
        if hit is None:
            return None
        s, i = hit
        return LineInfo(sonnet=s.number, index=i, text=s.lines[i],
                        previous=s.lines[i - 1] if i > 0 else None,
                        next=s.lines[i + 1] if i + 1 < len(s.lines) else None,
                        held_out=s.number in self.heldout_numbers,
                        in_training=s.number in self.train_numbers | self.heldout_numbers)

    def expected(self, line: str, direction: str) -> str | None:
        """The correct answer for `line` in `direction`, or None if the line is not in the sonnets."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        info = self.lookup(line)
        if info is None:
            return None
        return info.next if direction == "next" else info.previous

    def line_lengths(self, tokenizer, split: str = "train") -> range:
        """Shortest..longest line of a split's sonnets, in tokens (the SFT split: the answer lengths
        fine-tuning showed, so no held-out line is needed to choose them)."""
        n = [len(tokenizer(line, add_special_tokens=False)["input_ids"]) for s in self.split(split) for line in s.lines]
        return range(min(n), max(n) + 1)


def line_pairs(sonnets: list[Sonnet], limit: int | None = None) -> list[tuple[str, str]]:
    """Adjacent (line, next line) pairs; `limit` keeps an evenly spread subset."""
    pairs = [(s.lines[i], s.lines[i + 1]) for s in sonnets for i in range(len(s.lines) - 1)]
    if limit is not None and limit < len(pairs):
        stride = len(pairs) / limit
        pairs = [pairs[int(k * stride)] for k in range(limit)]
    return pairs


# ---------------------------------------------------------------------------------------------
# How answers are decoded (the same in the evaluation, the trainer's eval and the page)

@dataclass(frozen=True)
class Decoding:
    gen_length: int = GEN_LENGTH  # chat: MDM answer slots (= block length = steps); ARM: max new tokens
    block_length: int | None = None  # chat, MDM: semi-autoregressive blocks (None: one block, as in the paper)
    lengths: range | None = None  # MDM candidate answer lengths; chat: None lets gen_length decide,
    # completion: the gap lengths searched (None: 1 .. gen_length - 1)
    likelihood_samples: int = LIKELIHOOD_SAMPLES  # MDM, either protocol's search: ELBO samples per candidate (0: off)
    boundary_slots: int = BOUNDARY_SLOTS  # completion, MDM: that likelihood counts the line boundary (0: off)
    rescore_top: int = RESCORE_TOP  # MDM searches: the candidates of best confidence that likelihood scores (0: all)

    def __post_init__(self):
        for name in ("likelihood_samples", "boundary_slots", "rescore_top"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def for_model(cls, card, corpus: PoemCorpus | None = None, tokenizer=None) -> "Decoding":
        """A model trained here: its fine-tuning answer length, searched over its SFT line lengths;
        any other model (LLaDA-8B): 32 slots, no search."""
        if not card.trained_here or corpus is None:
            return cls()
        return cls(gen_length=card.answer_slots or GEN_LENGTH, lengths=corpus.line_lengths(tokenizer))

    def gap_lengths(self) -> range:
        return self.lengths or range(1, self.gen_length)

    def to_json(self) -> dict:
        d = asdict(self)
        d["lengths"] = None if self.lengths is None else [self.lengths.start, self.lengths.stop - 1]
        return d


def default_protocol(card) -> str:
    """A model trained here and any base model: completion; an instruction model (LLaDA-8B-Instruct):
    the paper's chat question."""
    return "completion" if card.trained_here or not card.chat else "chat"


# ---------------------------------------------------------------------------------------------
# The completion protocol's canvas

@dataclass(frozen=True)
class TextFormat:
    """How two adjacent lines read in running text: first + sep + second + end."""

    sep: str
    end: str


SONNET_TEXT = TextFormat("\n", "")
COUPLET_TEXT = TextFormat("，", "。")


def text_format(line: str) -> TextFormat:
    return COUPLET_TEXT if is_chinese(line) else SONNET_TEXT


def given_line(line: str) -> str:
    """The line as the canvas holds it: stripped; a couplet line without its closing punctuation."""
    line = line.strip()
    return line.rstrip("，。,.") if is_chinese(line) else line


def completion_canvas(tokenizer, ids, line: str, direction: str, gap: int) -> list[int]:
    """EOS line sep [MASK x gap] end EOS (next), or EOS [MASK x gap] sep line end EOS (previous)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    fmt = text_format(line)
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    given, sep, end = enc(given_line(line)), enc(fmt.sep), enc(fmt.end)
    if not given:
        raise ValueError("the line is empty")
    body = given + sep + [ids.mask] * gap if direction == "next" else [ids.mask] * gap + sep + given
    return [ids.eos] + body + end + [ids.eos]


def completion_batch(tokenizer, ids, lines: Sequence[str], direction: str, lengths: Sequence[int],
                     paired: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One canvas per (gap length, line), row k * B + b, shortest gaps first, right-padded
    -> canvases [K * B, W], attention mask [K * B, W] (0 on the padding, which is never attended).
    paired: one canvas per line instead, lines[i] with a gap of lengths[i] -> [B, W]."""
    from .generation import MAX_CANDIDATES

    if paired:
        if len(lengths) != len(lines):
            raise ValueError(f"paired canvases need one gap length per line, got {len(lengths)} for {len(lines)}")
        rows = [completion_canvas(tokenizer, ids, line, direction, L) for line, L in zip(lines, lengths)]
    elif not 1 <= len(lengths) <= MAX_CANDIDATES:  # before anything walks them
        raise ValueError(f"the completion searches 1 to {MAX_CANDIDATES} gap lengths, got {len(lengths)}")
    else:
        rows = [completion_canvas(tokenizer, ids, line, direction, L) for L in sorted(lengths) for line in lines]
    width = max(len(r) for r in rows)
    canvases = torch.full((len(rows), width), ids.pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        canvases[i, :len(r)] = torch.tensor(r)
        attn[i, :len(r)] = 1
    return canvases, attn


def completion_config(width: int):
    """One block over the canvas after its leading EOS, one token revealed per step."""
    from .generation import GenerationConfig

    return GenerationConfig(gen_length=width - 1, block_length=width - 1, steps=width - 1, temperature=0.0)


def completion_steps(denoiser, tokenizer, ids, lines: Sequence[str], direction: str, decoding: Decoding):
    """The masked-diffusion side of the completion protocol: a Step stream (generation.candidate_steps).

    Each gap length (`decoding.gap_lengths()`) is a candidate. The kept one has the best mean
    log-confidence of its revealed tokens plus (decoding.likelihood_samples > 0) the mean log-likelihood
    per token of its answer text read as a line of its own (`answer_likelihood`). Confidence judges each
    token in the order the sampler committed it; the likelihood judges the finished line from every
    masking ratio and, with boundary_slots > 0, whether a line can end (next) or begin (previous) right
    where the answer does: the confidence alone misses a gap one token short filled with the rest of the
    line. The likelihood reads only the `rescore_top` candidates of best confidence per line (0: all):
    the others are not kept; of those, an answer that `repeats` its given line is ruled out.
    """
    from .generation import candidate_steps

    lengths = decoding.gap_lengths()
    canvases, attn = completion_batch(tokenizer, ids, lines, direction, lengths)
    rescore = None
    if decoding.likelihood_samples:
        def rescore(final: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # [N]; row k * B + b answers lines[b]
            rows = rows.tolist()
            given = [lines[r % len(lines)] for r in rows]
            answers = [gap_text(tokenizer, ids, row, canvases[r].tolist(), line)
                       for row, r, line in zip(final.tolist(), rows, given)]
            score = answer_likelihood(denoiser, tokenizer, ids, given, answers, direction,
                                      decoding.likelihood_samples, decoding.boundary_slots)
            return score.masked_fill(repeats(given, answers), -torch.inf).to(final.device)
    return candidate_steps(denoiser, canvases, attn, len(lengths), completion_config(canvases.shape[1]),
                           prompt_length=1, mask_id=ids.mask, eos_id=ids.eos, eot_id=ids.eot, rescore=rescore,
                           rescore_top=decoding.rescore_top)


def chat_steps(denoiser, tokenizer, ids, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None, config,
               decoding: Decoding, given: Sequence[str] | None = None):
    """The masked-diffusion side of the chat protocol: the answer-length search over `decoding.lengths`
    (generation.length_search_steps) of prompt_ids [B, P] (left-padded; attention_mask [B, P] or None);
    `given`: per prompt, the line its question asks about (None: a question about no line).

    The kept length has the best mean log-confidence of its revealed tokens plus (likelihood_samples > 0)
    the mean log-likelihood per token of its answer slots in the finished canvas (the question before
    them, the stop token after: `likelihood.gap_log_likelihood`, seed 0), as the completion protocol keeps
    its gap: chosen on the SFT sonnets' pairs, where it beat the confidence alone on both directions. As
    there, only the `rescore_top` candidates of best confidence per question are scored (0: all), and an
    empty answer (a stop token in its first slot) is ruled out, as is one that `repeats` its given line.
    """
    from .generation import length_search_steps
    from .likelihood import gap_log_likelihood
    from .tokenization import decode_answer

    lengths, samples = decoding.lengths, decoding.likelihood_samples
    if not lengths:
        raise ValueError("a length search needs candidate lengths (Decoding.lengths)")
    if given is not None and len(given) != prompt_ids.shape[0]:
        raise ValueError(f"given: one line per prompt, got {len(given)} for {prompt_ids.shape[0]} prompts")
    rescore = None
    if samples:
        (B, P), ordered = prompt_ids.shape, sorted(lengths)

        def rescore(final: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:  # final [N, P + G]; row k * B + b:
            x, rows = final.cpu(), rows.cpu()  # length ordered[k]; the likelihood samples its masks on the CPU
            n = torch.tensor(ordered)[rows // B]  # [N] answer slots per row
            col = torch.arange(x.shape[1]) - P  # [P + G] each column's answer slot (< 0: the prompt)
            slots = (col >= 0) & (col[None] < n[:, None])  # [N, P + G]
            attn = None if attention_mask is None else torch.cat(  # the prompt's padding, then the answer
                [attention_mask.cpu().long()[rows % B], torch.ones_like(x[:, P:])], 1)
            total = gap_log_likelihood(denoiser, x, slots, attn, mask_id=ids.mask, mc_num=samples, seed=0)
            out = torch.isin(x[:, P], torch.tensor([t for t in (ids.eos, ids.eot) if t is not None]))  # [N] empty
            if given is not None:
                answers = [decode_answer(tokenizer, row[P:P + k], ids) for row, k in zip(x.tolist(), n.tolist())]
                out |= repeats([given[r % B] for r in rows.tolist()], answers)
            return (total / n).masked_fill(out, -torch.inf).to(final.device)  # never kept
    return length_search_steps(denoiser, prompt_ids, attention_mask, config, lengths, mask_id=ids.mask,
                               eos_id=ids.eos, eot_id=ids.eot, rescore=rescore, rescore_top=decoding.rescore_top)


def answer_likelihood(denoiser, tokenizer, ids, lines: Sequence[str], answers: Sequence[str], direction: str,
                      samples: int = LIKELIHOOD_SAMPLES, boundary_slots: int = BOUNDARY_SLOTS) -> torch.Tensor:
    """Mean log-likelihood per token of each answer text read as a line of its own next to its given line
    -> [N] nats; an empty answer: -inf. Its n tokens: their ELBO in the completion canvas of the answer's own
    length (`likelihood.gap_log_likelihood`, `samples` per answer, seed 0); with boundary_slots > 0, one token
    more: the line boundary just outside the answer (`line_boundary`), over n + 1 tokens. Each distinct
    (line, answer) is scored once (a row's estimate does not depend on the rest of its batch)."""
    from .likelihood import gap_log_likelihood

    distinct = dict.fromkeys(zip(lines, answers))  # (line, answer) -> None, in order
    tokens = {p: tokenizer(p[1], add_special_tokens=False)["input_ids"] for p in distinct}
    pairs = [p for p in distinct if tokens[p]]  # an empty answer has nothing to score
    enc = [tokens[p] for p in pairs]
    if not pairs:
        return torch.full((len(answers),), float("-inf"))
    x, attn = completion_batch(tokenizer, ids, [line for line, _ in pairs], direction, [len(e) for e in enc],
                               paired=True)  # [U, W] one canvas per distinct answer, its gap as long as the answer
    slots = (x == ids.mask) & attn.bool()
    x[slots] = torch.tensor([t for e in enc for t in e])  # row-major: each row's gap, in order
    total = gap_log_likelihood(denoiser, x, slots, attn, mask_id=ids.mask, mc_num=samples, seed=0)  # [U]
    n = slots.sum(1)
    if boundary_slots:
        total = total + line_boundary(denoiser, tokenizer, ids, [line for line, _ in pairs], enc, direction,
                                      boundary_slots)
        n = n + 1
    score = dict(zip(pairs, (total / n).tolist()))
    return torch.tensor([score.get((line, a), float("-inf")) for line, a in zip(lines, answers)])


def line_boundary(denoiser, tokenizer, ids, lines: Sequence[str], answers: Sequence[Sequence[int]], direction: str,
                  slots: int = BOUNDARY_SLOTS) -> torch.Tensor:
    """log p(a line boundary right outside each answer) -> [N] nats; answers: token ids, at least one each.

    The answer stands next to its given line as in the completion canvas, but the text beyond it is
    `slots` masks: [MASK x slots] answer sep line end EOS (previous), EOS line sep answer [MASK x slots]
    (next). Read at the mask touching the answer: the probability of a token that ends a line (EOS, the
    separator, the closing punctuation). A whole line scores near 0; a piece of one scores low, as the
    model would put the line's missing words there. More than one mask: a lone mask at the edge of the
    text reads as the start of a pre-training row, where a line's first token always stood.
    """
    if slots < 1 or any(not a for a in answers):
        raise ValueError("line_boundary needs at least one slot and a non-empty answer per line")
    rows = []
    for line, answer in zip(lines, answers):
        canvas = completion_canvas(tokenizer, ids, line, direction, len(answer))
        gap = [i for i, t in enumerate(canvas) if t == ids.mask]
        for i, t in zip(gap, answer):
            canvas[i] = t
        rows.append([ids.mask] * slots + canvas[1:] if direction == "previous"
                    else canvas[:gap[-1] + 1] + [ids.mask] * slots)
    W = max(len(r) for r in rows)
    x = torch.full((len(rows), W), ids.pad, dtype=torch.long)
    attn = torch.zeros_like(x)
    for r, row in enumerate(rows):  # previous: right-padded; next: left-padded (RoPE sees relative positions)
        at = slice(0, len(row)) if direction == "previous" else slice(W - len(row), W)
        x[r, at], attn[r, at] = torch.tensor(row), 1
    col = slots - 1 if direction == "previous" else W - slots  # the mask touching the answer, in every row
    logits = denoiser(x.to(denoiser.device), attn.to(denoiser.device), logits_slice=slice(col, col + 1)).logits
    logp = logits[:, 0].float().log_softmax(-1).cpu()  # [N, V]
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ends = torch.zeros_like(logp, dtype=torch.bool)
    for r, line in enumerate(lines):
        fmt = text_format(line)
        ends[r, [ids.eos, *enc(fmt.sep), *enc(fmt.end)]] = True
    return logp.masked_fill(~ends, -torch.inf).logsumexp(-1)


def arm_completion_prompt(canvas: list[int], mask_id: int) -> tuple[list[int], int]:
    """What a causal model reads of a completion canvas: the tokens before the gap -> (prompt, gap size).
    For "previous" that is the leading EOS alone: the given line comes after the gap."""
    start = canvas.index(mask_id)
    return canvas[:start], canvas.count(mask_id)


def arm_stop_ids(tokenizer, ids, line: str) -> list[int]:
    """A causal model ends its gap at the separator of the next line or at the end of text."""
    sep = tokenizer(text_format(line).sep, add_special_tokens=False)["input_ids"]
    return sorted({ids.eos, ids.eot} | ({sep[0]} if len(sep) == 1 else set()))


def gap_text(tokenizer, ids, row: Sequence[int], canvas: Sequence[int], line: str) -> str:
    """The decoded gap of a finished canvas row: its slots up to an EOS, cut at a line separator."""
    from .tokenization import decode_answer

    return _first_line(decode_answer(tokenizer, [t for t, c in zip(row, canvas) if c == ids.mask], ids), line)


def arm_gap_text(tokenizer, tokens: Sequence[int], line: str) -> str:
    """The ARM's decoded continuation of a completion prompt, cut at a line separator."""
    return _first_line(tokenizer.decode(tokens, skip_special_tokens=True), line)


def _first_line(text: str, line: str) -> str:
    return text.split(text_format(line).sep)[0].split("\n")[0].strip()


# ---------------------------------------------------------------------------------------------
# Answering batches (MDM or ARM, either protocol) through a denoiser

class Answerer:
    """Answers batches of poem questions greedily with the shared samplers, through `denoiser`
    (the running back end; default: PyTorch). `batch_size` counts rows of a forward pass."""

    def __init__(self, loaded, decoding: Decoding, denoiser=None, batch_size: int = 256):
        from .backends import TorchDenoiser

        self.loaded, self.decoding, self.batch_size = loaded, decoding, batch_size
        self.denoiser = denoiser or TorchDenoiser(loaded.model)
        self.causal = loaded.card.causal
        if not self.causal:
            self.chat_config().validate(self.denoiser.max_length, 1, supports_cache=True)

    def chat_config(self):
        from .generation import GenerationConfig

        d = self.decoding
        return GenerationConfig(gen_length=d.gen_length, block_length=d.block_length or d.gen_length,
                                steps=d.gen_length, temperature=0.0)

    def _batched(self, items: list, rows_per_item: int, fn, progress: Callable[[float], None]) -> list:
        n, out = max(1, self.batch_size // rows_per_item), []
        for k in range(0, len(items), n):
            out += fn(items[k:k + n])
            progress(len(out) / len(items))
        return out

    def chat(self, conversations: list[list[dict]], given: list[str],
             progress: Callable[[float], None] = lambda f: None) -> list[str]:
        """Chat protocol: conversations ([{"role", "content"}], ending with a user turn about the line
        `given[i]`) -> answers."""
        search = self.decoding.lengths if not self.causal else None
        return self._batched(list(zip(conversations, given)), len(search) if search else 1,
                             lambda batch: self._chat_batch(*map(list, zip(*batch))), progress)

    def _chat_batch(self, conversations: list[list[dict]], given: list[str]) -> list[str]:
        from .generation import generate_answers, pad_prompts
        from .tokenization import chat_prompt_ids, decode_answer

        tok, ids, d = self.loaded.tokenizer, self.loaded.ids, self.decoding
        x, attn = pad_prompts([chat_prompt_ids(tok, c) for c in conversations], ids.pad)  # [B, P], left-padded
        if d.lengths and not self.causal:
            final = None
            for final in chat_steps(self.denoiser, tok, ids, x, attn, self.chat_config(), d, given):
                pass
            seq = final.ids
        else:
            seq = generate_answers(self.denoiser, x, attn, ids, config=None if self.causal else self.chat_config(),
                                   max_new_tokens=d.gen_length)
        return [decode_answer(tok, row, ids) for row in seq[:, x.shape[1]:].tolist()]

    def complete(self, lines: list[str], direction: str, progress: Callable[[float], None] = lambda f: None) -> list[str]:
        """Completion protocol: the line next to (after / before) each given line."""
        rows = 1 if self.causal else len(self.decoding.gap_lengths())
        return self._batched(lines, rows, lambda batch: self._complete_batch(batch, direction), progress)

    def _complete_batch(self, lines: list[str], direction: str) -> list[str]:
        from .generation import generate_arm, pad_prompts

        tok, ids, lengths = self.loaded.tokenizer, self.loaded.ids, self.decoding.gap_lengths()
        if self.causal:  # left to right over the same canvas (its longest gap), stopping at a separator
            prompts = [arm_completion_prompt(completion_canvas(tok, ids, line, direction, max(lengths)), ids.mask)[0]
                       for line in lines]
            x, attn = pad_prompts(prompts, ids.pad)
            seq = generate_arm(self.denoiser, x, attn, max_new_tokens=max(lengths) + 1,
                               stop_ids=arm_stop_ids(tok, ids, lines[0]))
            return [arm_gap_text(tok, row, line) for row, line in zip(seq[:, x.shape[1]:].tolist(), lines)]
        final = None
        for final in completion_steps(self.denoiser, tok, ids, lines, direction, self.decoding):
            pass
        return [gap_text(tok, ids, row, canvas, line)
                for row, canvas, line in zip(final.ids.tolist(), final.canvas.tolist(), lines)]


# ---------------------------------------------------------------------------------------------
# Evaluation

@dataclass
class EvalResult:
    model: str
    kind: str  # "MDM" or "ARM"
    protocol: str  # "completion" or "chat"
    split: str  # "heldout" or "train"
    forward: float  # exact match, next line
    reversal: float  # exact match, previous line
    n_pairs: int  # questions per direction
    multiturn: float | None = None  # chat: exact match of the follow-up answer ("and the line after that?")
    n_followups: int = 0
    items: list[dict] = field(default_factory=list)  # every question: given, direction, expected, answer, correct

    def examples(self, direction: str, correct: bool = True) -> list[dict]:
        return [i for i in self.items if i["direction"] == direction and i["correct"] == correct]


def evaluate(loaded, corpus: PoemCorpus, split: str = "heldout", protocol: str = "completion", *,
             decoding: Decoding | None = None, denoiser=None, limit: int | None = None, multiturn: bool = False,
             progress: Callable[[float], None] = lambda f: None) -> EvalResult:
    """Forward / reversal exact match on the adjacent line pairs of `split`'s sonnets under `protocol`
    (chat: with `multiturn`, also the follow-up question). `decoding` defaults to the model's own
    (`Decoding.for_model`); `progress` gets the fraction of the questions answered."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    decoding = decoding or Decoding.for_model(loaded.card, corpus, loaded.tokenizer)
    answer = Answerer(loaded, decoding, denoiser)
    pairs = line_pairs(corpus.split(split), limit)
    chat = protocol == "chat"
    turns = multiturn and chat
    share = 0.25 if turns else 0.5  # of the progress, per direction (the follow-ups take the other half)
    if chat:
        fwd = answer.chat([[_user(question(a, "next"))] for a, _ in pairs], [a for a, _ in pairs],
                          lambda f: progress(share * f))
        rev = answer.chat([[_user(question(b, "previous"))] for _, b in pairs], [b for _, b in pairs],
                          lambda f: progress(share * (1 + f)))
    else:
        fwd = answer.complete([a for a, _ in pairs], "next", lambda f: progress(share * f))
        rev = answer.complete([b for _, b in pairs], "previous", lambda f: progress(share * (1 + f)))
    fwd_ok = [normalise(x) == normalise(b) for x, (_, b) in zip(fwd, pairs)]
    rev_ok = [normalise(x) == normalise(a) for x, (a, _) in zip(rev, pairs)]
    follow_ok = _followups(answer, pairs, progress) if turns else []
    progress(1.0)
    items = ([dict(given=a, direction="next", expected=b, answer=x, correct=ok)
              for (a, b), x, ok in zip(pairs, fwd, fwd_ok)]
             + [dict(given=b, direction="previous", expected=a, answer=x, correct=ok)
                for (a, b), x, ok in zip(pairs, rev, rev_ok)])
    return EvalResult(model=loaded.name, kind="ARM" if loaded.card.causal else "MDM", protocol=protocol, split=split,
                      forward=_mean(fwd_ok), reversal=_mean(rev_ok), n_pairs=len(pairs),
                      multiturn=_mean(follow_ok) if follow_ok else None, n_followups=len(follow_ok), items=items)


def _followups(answer: Answerer, pairs, progress) -> list[bool]:
    """A chain of two adjacent pairs: ask one step, then "and the line after/before that?" on the
    model's own first answer; the follow-up's expected line is two away from the asked one."""
    chains = [(p, q) for p, q in zip(pairs, pairs[1:]) if p[1] == q[0]]
    convs = []  # (asked line, expected follow-up answer, direction)
    for (a, _), (_, c) in chains:
        convs.append((a, c, "next"))
        convs.append((c, a, "previous"))
    if not convs:
        return []
    first = answer.chat([[_user(question(g, d))] for g, _, d in convs], [g for g, _, _ in convs],
                        lambda f: progress(0.5 + 0.25 * f))
    second = answer.chat([[_user(question(g, d)), {"role": "assistant", "content": f}, _user(followup_question(d))]
                          for (g, _, d), f in zip(convs, first)], first,  # the follow-up asks about the answer
                         lambda f: progress(0.75 + 0.25 * f))
    return [normalise(x) == normalise(e) for x, (_, e, _) in zip(second, convs)]


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _mean(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


# The page's evaluation and the one a training run stores: all held-out pairs, 65 of the SFT sonnets'
# (as many as the held-out split has; the whole SFT split would take five times as long).
STORED_LIMITS = {"heldout": None, "train": 65}


def evaluation_jobs(loaded, protocols: Sequence[str] = PROTOCOLS, splits: Sequence[str] = ("heldout",)):
    """(protocol, split) pairs a model is evaluated on: a base model never gets the chat question."""
    return [(p, s) for p in protocols for s in splits if p != "chat" or loaded.card.chat]


def job_cost(loaded, decoding: Decoding, n_pairs: int) -> float:
    """Rough forward-pass rows of one (protocol, split) job, so that a progress bar moves evenly: the
    MDM decodes every candidate length, the ARM one short answer."""
    if loaded.card.causal:
        return n_pairs * 2 * 0.1 * decoding.gen_length
    return n_pairs * 2 * sum(decoding.gap_lengths())


def evaluate_all(loaded, corpus: PoemCorpus, *, protocols: Sequence[str] = PROTOCOLS, splits: Sequence[str] = ("heldout",),
                 decoding: Decoding | None = None, denoiser=None, limits: dict | None = None, multiturn: bool = False,
                 progress: Callable[[float, str], None] = lambda f, what: None) -> list[EvalResult]:
    """Every (protocol, split) of one model; `limits`: line pairs per split (None: all); `progress`
    gets the overall fraction (weighted by each job's cost) and what runs."""
    decoding = decoding or Decoding.for_model(loaded.card, corpus, loaded.tokenizer)
    limits = limits or {}
    jobs = evaluation_jobs(loaded, protocols, splits)
    costs = [job_cost(loaded, decoding, len(line_pairs(corpus.split(s), limits.get(s)))) for _, s in jobs]
    out, done = [], 0.0
    for (protocol, split), cost in zip(jobs, costs):
        what = f"{loaded.name}: {protocol}, {split} sonnets"
        out.append(evaluate(loaded, corpus, split, protocol, decoding=decoding, denoiser=denoiser,
                            limit=limits.get(split), multiturn=multiturn,
                            progress=lambda f: progress((done + f * cost) / sum(costs), what)))
        done += cost
    return out


# ---------------------------------------------------------------------------------------------
# The stored evaluation: computed once (by the training run or `eval --store`), shown at once by the page

def evaluation_key(loaded, decoding: Decoding, limits: dict, multiturn: bool = False) -> dict:
    """What a stored evaluation must have been computed with to stand for this model today."""
    return dict(fingerprint=loaded.fingerprint, decoding=decoding.to_json(), scoring=SCORING_VERSION, limits=limits,
                multiturn=multiturn)


def store_evaluation(folder: str | Path, key: dict, results: list[EvalResult]) -> Path:
    path = Path(folder) / EVALUATION
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(key=key, results=[asdict(r) for r in results]), indent=1))
    tmp.replace(path)
    return path


class StaleEvaluation(ValueError):
    """A stored evaluation computed for other weights or other settings."""


def stored_evaluation(folder: str | Path | None, key: dict) -> list[EvalResult] | None:
    """The folder's stored evaluation (None when there is none); StaleEvaluation when it was computed
    with another fingerprint or other settings than `key`."""
    path = Path(folder) / EVALUATION if folder is not None else None
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        results = [EvalResult(**r) for r in data["results"]]
        stored = data["key"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise StaleEvaluation(f"{path} is unreadable ({type(e).__name__}: {e}); run the evaluation again") from None
    if stored.get("fingerprint") != key["fingerprint"]:
        raise StaleEvaluation(f"{path} was computed for other weights (fingerprint {stored.get('fingerprint')}, "
                              f"the model has {key['fingerprint']}); run the evaluation again")
    if stored != key:
        diff = sorted(k for k in key if stored.get(k) != key[k])
        raise StaleEvaluation(f"{path} was computed with other settings ({', '.join(diff)}); run the evaluation again")
    return results


def format_table(results: list[EvalResult]) -> str:
    turns = any(r.n_followups for r in results)
    rows = ["| Model | Protocol | Split | Forward | Reversal | Pairs |" + (" Multi-turn |" if turns else ""),
            "| --- | --- | --- | --- | --- | --- |" + (" --- |" if turns else "")]
    for r in results:
        row = (f"| {r.model} [{r.kind}] | {r.protocol} | {r.split} | {100 * r.forward:.1f} | "
               f"{100 * r.reversal:.1f} | {r.n_pairs} |")
        if turns:
            row += f" {100 * r.multiturn:.1f} |" if r.n_followups else " — |"
        rows.append(row)
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# CLI

def _lengths_arg(text: str) -> range | None:
    from .generation import parse_lengths

    if text.strip().lower() == "none":
        return None
    try:
        return parse_lengths(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llada_app.poems", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("eval", help="forward / reversal exact match, per protocol and split")
    p.add_argument("--model", action="append", required=True,
                   help="model folder (repeat the flag to put several models in one table)")
    p.add_argument("--protocol", choices=[*PROTOCOLS, "both"], default="both",
                   help="completion: fill the gap next to the line in running text; chat: ask through the chat "
                        "template (base models skip it); both (default)")
    p.add_argument("--split", choices=[*SPLITS, "both"], default="heldout",
                   help="heldout: the sonnets kept out of SFT, only pre-trained on (default); train: the SFT sonnets")
    p.add_argument("--limit", type=int, default=None,
                   help="at most N line pairs per direction (default: all held-out pairs, 65 of the SFT split)")
    p.add_argument("--gen-length", type=int, default=None,
                   help="chat: MDM answer slots = block length = steps, ARM max new tokens (default: the model's "
                        f"fine-tuning answer length, else {GEN_LENGTH})")
    p.add_argument("--block-length", type=int, default=None,
                   help="chat, MDM: semi-autoregressive block length, still one token per step (default: one block)")
    p.add_argument("--lengths", type=_lengths_arg, default=..., metavar="MIN:MAX|none",
                   help="MDM candidate answer lengths in tokens, each decoded, the best kept (default: the "
                        "line lengths of a model's SFT sonnets; none: chat decodes the gen length, completion 1..31)")
    p.add_argument("--likelihood-samples", type=int, default=LIKELIHOOD_SAMPLES, metavar="N",
                   help="MDM, either protocol's search: masked samples of the likelihood of each candidate's answer "
                        "(completion: its text re-read in a gap of its own length; chat: its slots before the stop "
                        "token), whose mean per token is added to the candidate's mean log-confidence before the "
                        f"best is kept (default {LIKELIHOOD_SAMPLES}; 0: confidence alone)")
    p.add_argument("--rescore-top", type=int, default=RESCORE_TOP, metavar="N",
                   help="MDM: that likelihood is computed for each question's N most confident candidates only, the "
                        f"others are not kept (default {RESCORE_TOP}; 0: every candidate)")
    p.add_argument("--boundary-slots", type=int, default=BOUNDARY_SLOTS, metavar="N",
                   help="completion, MDM: the answer's likelihood (above) counts one token more, the line boundary, read "
                        "at the first of N masks put beyond the answer in place of the rest of the text (default "
                        f"{BOUNDARY_SLOTS}; 0: the answer's tokens alone)")
    p.add_argument("--multiturn", action="store_true", help="chat: also ask the follow-up question")
    p.add_argument("--store", action="store_true",
                   help=f"write the results into each model folder ({EVALUATION}), where the page shows them")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")

    from tqdm import tqdm

    from .loading import ModelLoadError, load_model

    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    splits = SPLITS if args.split == "both" else (args.split,)
    results = []
    for model_dir in args.model:
        try:
            loaded = load_model(model_dir, device=args.device)
        except ModelLoadError as e:
            parser.error(str(e))
        corpus = PoemCorpus.for_card(loaded.card)
        decoding = Decoding.for_model(loaded.card, corpus, loaded.tokenizer)
        if args.gen_length:
            decoding = replace(decoding, gen_length=args.gen_length)
        if args.block_length:
            decoding = replace(decoding, block_length=args.block_length)
        if args.lengths is not ...:
            decoding = replace(decoding, lengths=args.lengths)
        try:
            decoding = replace(decoding, likelihood_samples=args.likelihood_samples,
                               boundary_slots=args.boundary_slots, rescore_top=args.rescore_top)
        except ValueError as e:
            parser.error(str(e))
        try:
            with tqdm(total=100, desc=loaded.name, unit="%", bar_format="{l_bar}{bar}| {elapsed}",
                      disable=args.json or not sys.stderr.isatty()) as bar:
                limits = STORED_LIMITS if args.limit is None else {s: args.limit for s in SPLITS}
                mine = evaluate_all(loaded, corpus, protocols=protocols, splits=splits, decoding=decoding,
                                    limits=limits, multiturn=args.multiturn,
                                    progress=lambda f, what: (bar.set_description(what),
                                                              bar.update(round(100 * f) - bar.n)))
        except ValueError as e:  # decoding settings the sampler refuses
            parser.error(str(e))
        if args.store:
            store_evaluation(model_dir, evaluation_key(loaded, decoding, limits, args.multiturn), mine)
        results += mine
    if args.json:
        json.dump([asdict(r) for r in results], sys.stdout, indent=2)
        print()
    else:
        print(format_table(results))


if __name__ == "__main__":
    main()
