"""The reversal-poem task: question phrasings, corpus lookup and the forward/reversal evaluation.

As in the LLaDA paper (§5 of DESIGN.md): ask for the next line (forward) or the previous line
(reversal) of a verse line through the chat interface; score exact match after normalising case,
whitespace and punctuation. The sonnets held out of SFT were only ever read in reading order during
pre-training, so an autoregressive model answers their forward questions but not the reversal ones.

CLI: `python -m llada_app.poems eval --model DIR [--split heldout|train] [--json] [--limit N]`.
"""
from __future__ import annotations

import argparse
import json
import re
import string
import sys
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


_PUNCT = str.maketrans("", "", string.punctuation + "\u2018\u2019\u201c\u201d")


def normalise(text: str) -> str:
    """Case, whitespace and punctuation do not count in exact match."""
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
