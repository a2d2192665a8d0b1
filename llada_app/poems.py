"""The reversal-poem task: question phrasings, corpus lookup and the forward/reversal evaluation.

As in the LLaDA paper (§5 of DESIGN.md): ask for the next line (forward) or the previous line
(reversal) of a verse line through the chat interface; score exact match after normalising case,
whitespace and punctuation. The sonnets held out of SFT were only ever read in reading order during
pre-training, so an autoregressive model answers their forward questions but not the reversal ones.

CLI: `python -m llada_app.poems eval --model DIR [--split heldout|train] [--json] [--limit N] [--infill]`.
"""
from __future__ import annotations

import argparse
import json
import string
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .data import SONNETS_FILE, Sonnet, load_sonnets, split_corpus

# Variant 0 of each list is the canonical phrasing (the one the evaluation and the UI ask).
PHRASINGS = {
    "next": [
        'What is the next line after "{line}"?',
        'Which line follows "{line}"?',
        'Continue the sonnet after "{line}".',
        'What comes after "{line}"?',
    ],
    "previous": [
        'What is the line before "{line}"?',
        'Which line comes before "{line}"?',
        'What line precedes "{line}"?',
        'What comes before "{line}"?',
    ],
}
FOLLOWUPS = {
    "next": ["And the line after that?", "And the next one?", "What comes after that?"],
    "previous": ["And the line before that?", "And the one before?", "What comes before that?"],
}
FIRST_LINE = ["What is the first line of Sonnet {n}?", "How does Sonnet {n} begin?",
              "Quote the opening line of Sonnet {n}."]
WHICH_SONNET = ['Which sonnet is "{line}" from?', 'In which sonnet does "{line}" appear?']
DEFAULT_N_SONNETS = 30  # corpus size of the bundled models (first N sonnets); see assets/data/SOURCE.md
TRAINING_META = "training_meta.json"  # written by the trainer into each saved model folder


def question(line: str, direction: str, variant: int = 0) -> str:
    """'next' or 'previous' question about `line`; variant 0 is the canonical phrasing."""
    if direction not in PHRASINGS:
        raise ValueError(f"direction must be 'next' or 'previous', got {direction!r}")
    forms = PHRASINGS[direction]
    return forms[variant % len(forms)].format(line=line.strip())


def followup_question(direction: str, variant: int = 0) -> str:
    if direction not in FOLLOWUPS:
        raise ValueError(f"direction must be 'next' or 'previous', got {direction!r}")
    return FOLLOWUPS[direction][variant % len(FOLLOWUPS[direction])]


def first_line_question(number: int, variant: int = 0) -> str:
    return FIRST_LINE[variant % len(FIRST_LINE)].format(n=number)


def which_sonnet_question(line: str, variant: int = 0) -> str:
    return WHICH_SONNET[variant % len(WHICH_SONNET)].format(line=line.strip())


def which_sonnet_answer(number: int) -> str:
    return f"Sonnet {number}."


_PUNCT = str.maketrans("", "", string.punctuation + "\u2018\u2019\u201c\u201d" + "，。！？、；：「」『』《》（）")


def normalise(text: str) -> str:
    """Case, whitespace and punctuation (Chinese included) do not count in exact match."""
    return " ".join(text.lower().translate(_PUNCT).split())


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

    def __init__(self, sonnets: list[Sonnet], n_sonnets: int = DEFAULT_N_SONNETS):
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
    def for_model(cls, model_dir: str | Path | None = None, sonnets_file: str | Path = SONNETS_FILE) -> "PoemCorpus":
        """The corpus split recorded in a model folder's training_meta.json (default split otherwise)."""
        n = DEFAULT_N_SONNETS
        if model_dir is not None and (Path(model_dir) / TRAINING_META).is_file():
            n = json.loads((Path(model_dir) / TRAINING_META).read_text())["n_sonnets"]
        return cls(load_sonnets(sonnets_file), n)

    def split(self, name: str) -> list[Sonnet]:
        numbers = {"heldout": self.heldout_numbers, "train": self.train_numbers}.get(name)
        if numbers is None:
            raise ValueError(f"split must be 'heldout' or 'train', got {name!r}")
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
        """The correct answer to question(line, direction), or None if unknown."""
        info = self.lookup(line)
        if info is None:
            return None
        if direction not in PHRASINGS:
            raise ValueError(f"direction must be 'next' or 'previous', got {direction!r}")
        return info.next if direction == "next" else info.previous


# ---------------------------------------------------------------------------------------------
# Evaluation through the chat interface

GEN_LENGTH = 32  # MDM: gen length = block length = steps (the paper uses 28); > the longest line + EoT


@dataclass
class EvalResult:
    model: str
    split: str
    forward: float  # exact-match accuracy, next line
    reversal: float  # exact-match accuracy, previous line
    multiturn: float  # exact match of the follow-up answer ("and the line after/before that?")
    n_pairs: int  # questions per direction
    n_followups: int
    samples: list[dict]  # a few (question, expected, answer) triples for inspection
    infill_forward: float | None = None  # knowledge probe (MDM only, `infill=True`): see infill_accuracy
    infill_reversal: float | None = None


def _pairs(sonnets: list[Sonnet], limit: int | None) -> list[tuple[str, str]]:
    """Adjacent (line, next line) pairs; `limit` keeps an evenly spread subset."""
    pairs = [(s.lines[i], s.lines[i + 1]) for s in sonnets for i in range(len(s.lines) - 1)]
    if limit is not None and limit < len(pairs):
        stride = len(pairs) / limit
        pairs = [pairs[int(k * stride)] for k in range(limit)]
    return pairs


class ChatAnswerer:
    """Answers batches of chat conversations greedily with the shared samplers (MDM or ARM)."""

    def __init__(self, model, tokenizer, ids, gen_length: int = GEN_LENGTH, batch_size: int = 64,
                 block_length: int | None = None, length_search: Sequence[int] | None = None):
        from .backends import TorchDenoiser
        from .generation import GenerationConfig

        self.model, self.tokenizer, self.ids = model, tokenizer, ids
        self.denoiser = TorchDenoiser(model)
        self.causal = bool(getattr(model.config, "causal", False))
        self.gen_length, self.batch_size = gen_length, batch_size
        self.length_search = list(length_search) if length_search else None  # MDM: candidate answer lengths
        # MDM: one token per step, in one block (the paper's setting) unless `block_length` is given
        self.config = GenerationConfig(gen_length=gen_length, block_length=block_length or gen_length,
                                       steps=gen_length, temperature=0.0)
        if not self.causal:
            self.config.validate(self.denoiser.max_length, 1)

    def __call__(self, conversations: list[list[dict]],
                 progress: Callable[[float], None] = lambda f: None) -> list[str]:
        """-> the answers; `progress` gets the fraction answered after each batch."""
        n = self.batch_size  # rows per forward pass: a length search makes each prompt one row per candidate
        if self.length_search and not self.causal:
            n = max(1, n // len(self.length_search))
        out = []
        for k in range(0, len(conversations), n):
            out += self._batch(conversations[k:k + n])
            progress(len(out) / len(conversations))
        return out

    def _batch(self, conversations: list[list[dict]]) -> list[str]:
        from .generation import generate, generate_arm, generate_length_search, pad_prompts
        from .tokenization import chat_prompt_ids, decode_answer

        prompts = [chat_prompt_ids(self.tokenizer, c) for c in conversations]
        ids, attn = pad_prompts(prompts, self.ids.pad)  # [B, P], left-padded
        if self.causal:
            seq = generate_arm(self.denoiser, ids, attn, max_new_tokens=self.gen_length,
                               stop_ids=[self.ids.eot, self.ids.eos])
        elif self.length_search:
            seq = generate_length_search(self.denoiser, ids, attn, self.config, self.length_search,
                                         mask_id=self.ids.mask, eos_id=self.ids.eos, eot_id=self.ids.eot)
        else:
            seq = generate(self.denoiser, ids, attn, self.config, mask_id=self.ids.mask, eos_id=self.ids.eos,
                           eot_id=self.ids.eot)
        return [decode_answer(self.tokenizer, row, self.ids) for row in seq[:, ids.shape[1]:].tolist()]


def infill_accuracy(model, tokenizer, ids, pairs: list[tuple[str, str]]) -> tuple[float, float]:
    """Knowledge probe of a masked-diffusion model, outside the chat: exact match of a line infilled
    next to its neighbour the way pre-training showed them (EOS, line, newline, line, EOS), with the
    line's length given. A high infill score next to a low chat score means the model knows the
    text but answering through the chat does not reach that knowledge.
    -> (forward: the next line from the line, reversal: the previous line from the line)
    """
    import torch

    from .backends import TorchDenoiser
    from .generation import GenerationConfig, generate

    denoiser = TorchDenoiser(model)
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    newline = enc("\n")

    def fill(prompt: list[int], answer: list[int | None]) -> str:
        """Denoise the None slots of `answer` (the other tokens are fixed) -> the decoded slots."""
        G = len(answer)
        config = GenerationConfig(gen_length=G, block_length=G, steps=G, temperature=0.0,
                                  constraints={i: t for i, t in enumerate(answer) if t is not None})
        out = generate(denoiser, torch.tensor([prompt]), None, config, mask_id=ids.mask, eos_id=ids.eos,
                       eot_id=ids.eot)[0, len(prompt):].tolist()
        return tokenizer.decode([t for t, slot in zip(out, answer) if slot is None])

    fwd, rev = [], []
    for a, b in pairs:
        A, B = enc(a), enc(b)
        fwd.append(normalise(fill([ids.eos] + A + newline, [None] * len(B) + [ids.eos])) == normalise(b))
        rev.append(normalise(fill([ids.eos], [None] * len(A) + newline + B + [ids.eos])) == normalise(a))
    return sum(fwd) / len(fwd), sum(rev) / len(rev)


def evaluate(model, tokenizer, ids, corpus: PoemCorpus, split: str = "heldout", limit: int | None = None,
             name: str = "model", gen_length: int = GEN_LENGTH, multiturn: bool = True,
             infill: bool = False, block_length: int | None = None,
             length_search: Sequence[int] | None = None,
             progress: Callable[[float], None] = lambda f: None) -> EvalResult:
    """Forward / reversal / follow-up exact match on the adjacent line pairs of `split`'s sonnets;
    with `infill`, a masked-diffusion model also gets the knowledge probe (`infill_accuracy`);
    `length_search`: candidate answer lengths for the MDM (`generation.generate_length_search`);
    `progress` gets the fraction of the chat questions answered."""
    answer = ChatAnswerer(model, tokenizer, ids, gen_length, block_length=block_length, length_search=length_search)
    pairs = _pairs(corpus.split(split), limit)
    fwd_q = [[{"role": "user", "content": question(a, "next")}] for a, _ in pairs]
    rev_q = [[{"role": "user", "content": question(b, "previous")}] for _, b in pairs]
    share = 0.25 if multiturn else 0.5  # of the progress, per direction (the follow-ups take the other half)
    fwd_a = answer(fwd_q, lambda f: progress(share * f))
    rev_a = answer(rev_q, lambda f: progress(share * (1 + f)))
    fwd_ok = [normalise(x) == normalise(b) for x, (_, b) in zip(fwd_a, pairs)]
    rev_ok = [normalise(x) == normalise(a) for x, (a, _) in zip(rev_a, pairs)]
    follow_ok: list[bool] = []
    if multiturn:
        # A chain of two adjacent pairs: ask one step, then "and the line after/before that?" on the
        # model's own first answer; the follow-up's expected line is two away from the asked one.
        chains = [(p, q) for p, q in zip(pairs, pairs[1:]) if p[1] == q[0]]
        convs = []
        for (a, b), (_, c) in chains:
            convs.append(([{"role": "user", "content": question(a, "next")}], c, "next"))
            convs.append(([{"role": "user", "content": question(c, "previous")}], a, "previous"))
        first = answer([c for c, _, _ in convs], lambda f: progress(0.5 + 0.25 * f))
        second_q = [c + [{"role": "assistant", "content": f},
                         {"role": "user", "content": followup_question(d)}]
                    for (c, _, d), f in zip(convs, first)]
        second = answer(second_q, lambda f: progress(0.75 + 0.25 * f)) if second_q else []
        follow_ok = [normalise(x) == normalise(e) for x, (_, e, _) in zip(second, convs)]
    progress(1.0)  # also when there was no follow-up chain to ask
    samples = [dict(question=q[0]["content"], expected=b, answer=x)
               for q, x, (_, b) in list(zip(fwd_q, fwd_a, pairs))[:3]]
    samples += [dict(question=q[0]["content"], expected=a, answer=x)
                for q, x, (a, _) in list(zip(rev_q, rev_a, pairs))[:3]]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    probe = infill_accuracy(model, tokenizer, ids, pairs) if infill and not answer.causal else (None, None)
    return EvalResult(model=name, split=split, forward=mean(fwd_ok), reversal=mean(rev_ok),
                      multiturn=mean(follow_ok), n_pairs=len(pairs), n_followups=len(follow_ok),
                      samples=samples, infill_forward=probe[0], infill_reversal=probe[1])


def format_table(results: list[EvalResult]) -> str:
    """Shaped like the LLaDA paper's reversal-poem table (model, forward, reversal), plus follow-ups."""
    probe = any(r.infill_forward is not None for r in results)
    rows = ["| Model | Forward | Reversal | Multi-turn | Pairs |" + (" Infill fwd / rev |" if probe else ""),
            "| --- | --- | --- | --- | --- |" + (" --- |" if probe else "")]
    for r in results:
        multiturn = f"{100 * r.multiturn:.1f}" if r.n_followups else "—"  # not asked (--no-multiturn)
        row = f"| {r.model} ({r.split}) | {100 * r.forward:.1f} | {100 * r.reversal:.1f} | {multiturn} | {r.n_pairs} |"
        if probe:
            row += (f" {100 * r.infill_forward:.1f} / {100 * r.infill_reversal:.1f} |" if r.infill_forward is not None
                    else " — |")
        rows.append(row)
    return "\n".join(rows)


def _training_answer_slots(model_dir: str) -> int | None:
    meta = Path(model_dir) / TRAINING_META
    return json.loads(meta.read_text()).get("config", {}).get("answer_slots") if meta.is_file() else None


def sft_line_lengths(corpus: PoemCorpus, tokenizer) -> range:
    """Shortest..longest line of the SFT (train) sonnets, in tokens: the answer lengths SFT showed."""
    n = [len(tokenizer(line, add_special_tokens=False)["input_ids"]) for s in corpus.split("train") for line in s.lines]
    return range(min(n), max(n) + 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llada_app.poems", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("eval", help="forward / reversal exact match through the chat interface")
    p.add_argument("--model", action="append", required=True,
                   help="model folder (repeat the flag to put several models in one table)")
    p.add_argument("--split", choices=["heldout", "train"], default="heldout",
                   help="heldout: sonnets kept out of SFT (default); train: the SFT sonnets")
    p.add_argument("--limit", type=int, default=None, help="at most N line pairs per direction")
    p.add_argument("--gen-length", type=int, default=None,
                   help="MDM gen length = block length = steps; ARM max new tokens (default: the model's "
                        f"training answer_slots from {TRAINING_META}, else {GEN_LENGTH})")
    p.add_argument("--block-length", type=int, default=None,
                   help="MDM semi-autoregressive block length, still one token per step (default: the gen "
                        "length, one block, as in the paper)")
    p.add_argument("--length-search", nargs="?", const="train", default=None, metavar="MIN:MAX",
                   help="MDM: decode each answer at every length MIN..MAX tokens (stop token fixed after it) and "
                        "keep the most confident (generation.generate_length_search); without a value, the "
                        "range of line lengths in the SFT (train) sonnets")
    p.add_argument("--no-multiturn", action="store_true", help="skip the follow-up questions")
    p.add_argument("--infill", action="store_true",
                   help="also probe what a masked-diffusion model knows outside the chat: infill each line "
                        "next to its neighbour as in pre-training, its length given")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")

    from tqdm import tqdm

    from .generation import parse_lengths
    from .loading import load_model

    results = []
    for model_dir in args.model:
        loaded = load_model(model_dir, device=args.device)
        corpus = PoemCorpus.for_model(model_dir)
        gen_length = args.gen_length or _training_answer_slots(model_dir) or GEN_LENGTH
        kind = "ARM" if loaded.model.config.causal else "MDM"
        try:
            lengths = (sft_line_lengths(corpus, loaded.tokenizer) if args.length_search == "train"
                       else parse_lengths(args.length_search or ""))
            with tqdm(total=100, desc=f"{loaded.name} [{kind}]", unit="%", bar_format="{l_bar}{bar}| {elapsed}",
                      disable=args.json or not sys.stderr.isatty()) as bar:
                results.append(evaluate(loaded.model, loaded.tokenizer, loaded.ids, corpus, args.split, args.limit,
                                        name=f"{loaded.name} [{kind}]", gen_length=gen_length,
                                        multiturn=not args.no_multiturn, infill=args.infill,
                                        block_length=args.block_length, length_search=lengths,
                                        progress=lambda f: bar.update(round(100 * f) - bar.n)))
        except ValueError as e:  # decoding settings the sampler refuses
            parser.error(str(e))
    if args.json:
        json.dump([asdict(r) for r in results], sys.stdout, indent=2)
        print()
    else:
        print(format_table(results))


if __name__ == "__main__":
    main()
