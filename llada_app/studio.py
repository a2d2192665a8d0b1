"""The model-facing side of the app: prompts, sampling streams, display frames, back-end switching.

The Gradio page (`ui.py`) only turns widgets into a `ChatSettings` and shows the `Frame`s that this
module yields; everything it knows about sampling is the `Step` stream of `generation.py`, rendered
here into HTML: masks as masks, given text (a poem's given line, forced words) in its own style,
the tokens revealed in this step highlighted and coloured by their confidence, earlier ones plain.

One `Studio` serves every browser session: it holds no conversation (the page keeps each session's
history in its own `gr.State`), only the models and the current denoiser, which a lock lets the
Export tab swap while requests that already started finish on the denoiser they began with.
"""
from __future__ import annotations

import html
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch

from . import poems
from .backends import Denoiser, TorchDenoiser
from .compiled import CompiledDenoiser
from .loading import LoadedModel
from .tokenization import chat_prompt_ids, decode_answer

DECODING_MODES = {  # UI label -> (uses the threshold τ, cache)
    "vanilla": (False, "none"),
    "parallel threshold τ": (True, "none"),
    "prefix cache": (False, "prefix"),
    "dual cache": (False, "dual"),
    "threshold + dual cache": (True, "dual"),
}

# A few famous couplets (first line, second line), offered as examples to a Chinese-capable model.
CHINESE_COUPLETS = [("床前明月光", "疑是地上霜"), ("举头望明月", "低头思故乡"),  # Li Bai, 静夜思
                    ("白日依山尽", "黄河入海流"), ("欲穷千里目", "更上一层楼"),  # Wang Zhihuan, 登鹳雀楼
                    ("海内存知己", "天涯若比邻")]  # Wang Bo


RIVAL_BACKEND = "same mode, other back end"


class RequestError(ValueError):
    """A request the studio refuses, with a message meant for the person who sent it."""


class Stopped(Exception):
    """The person pressed Stop: the stream ended between two steps, nothing is left running."""


_KEPT = " (kept: confidence + likelihood)"  # a search's stats note when the likelihood re-scores its candidates


@dataclass
class ChatSettings:
    gen_length: int = 64  # answer canvas in tokens (masks at the start)
    steps: int = 64  # denoising steps over the whole canvas
    block_length: int = 32  # semi-autoregressive block size; gen_length must divide by it
    temperature: float = 0.0  # 0: greedy proposals
    cfg_scale: float = 0.0  # unsupervised classifier-free guidance weight (0: off)
    remasking: str = "low_confidence"  # or "random"
    mode: str = "vanilla"  # a key of DECODING_MODES
    threshold: float = 0.9  # τ for the threshold modes
    animate: bool = True  # False: show only the finished answer
    pace_ms: float = 0.0  # animation only: at least this long between two steps (0: as fast as the model)
    constraints: str = ""  # forced words "position:word, ..." (answer positions, e.g. "0:Shall, 5:summer")
    lengths: str = ""  # length search "MIN:MAX": decode every answer length in tokens, keep the best (poems.chat_steps)
    seed: int | None = None  # for temperature > 0 / random remasking


@dataclass
class Frame:
    """What the page shows of one answer at one moment."""

    html: str  # the canvas: masks, given text, this step's tokens coloured by confidence, earlier tokens plain
    text: str  # the answer decoded (the final answer once done)
    step: int
    nfe: int
    done: bool
    stats: str  # "NFE · tokens/s · back end" line


@dataclass
class PoemFrame:
    mdm: Frame
    arm: Frame | None  # None when no autoregressive twin is loaded
    expected: str | None  # the corpus line that answers the question, when the line is in the corpus
    question: str  # chat: the question asked; completion: the canvas in words
    protocol: str


@dataclass
class _View:
    """How one side's Step stream is shown and read."""

    blank: list[int]  # the starting canvas after the prompt (MASK where the model fills in)
    answer: Callable[[list[int], list[int]], str]  # (tokens, canvas) after the prompt -> the answer text
    causal: bool = False  # an autoregressive answer: it grows from nothing, after `before`
    before: list[int] = field(default_factory=list)  # causal: given tokens shown before the generated ones
    after: list[int] = field(default_factory=list)  # causal: given tokens after them (which it cannot see)


@dataclass
class Studio:
    mdm: LoadedModel  # the chat model (and, without a base, the completion model too)
    arm: LoadedModel | None = None
    base: LoadedModel | None = None  # the MDM's pre-trained base: the completion protocol runs on it
    denoiser: Denoiser | None = None  # None: a TorchDenoiser over mdm.model
    arm_note: str = ""  # why there is no ARM, shown in the poem tab
    eval_limit: int | None = None  # line pairs per direction in the page's evaluation (None: all)
    time_limit_s: float = 120.0  # per chat / poem request; the stream stops with an error past it
    eval_time_limit_s: float = 900.0  # per evaluation (a few minutes for the bundled pair on a 2-core CPU)
    frame_interval_s: float = 1 / 30  # at most this many frames per second reach the page
    onnx_cache: Path | None = None  # root of the ONNX export cache (None: export's default)
    compiled: bool = False  # the PyTorch models run through the captured path (llada_app/compiled.py)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _eval_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _onnx: Denoiser | None = field(default=None, repr=False)
    _torch: Denoiser | None = field(default=None, repr=False)

    def __post_init__(self):
        mdm_denoiser = CompiledDenoiser if self.compiled else TorchDenoiser
        self._torch = mdm_denoiser(self.mdm.model)
        if self.denoiser is None:
            self.denoiser = self._torch
        elif self.denoiser.name == "onnx":
            self._onnx = self.denoiser
        self._arm_denoiser = TorchDenoiser(self.arm.model) if self.arm is not None else None
        self._base_denoiser = mdm_denoiser(self.base.model) if self.base is not None else None

    # ---- model panel -------------------------------------------------------------------------
    def describe(self) -> dict:
        info = self.mdm.describe()
        denoiser = self.current_denoiser()
        info["backend"] = denoiser.name + (" (compiled)" if isinstance(denoiser, CompiledDenoiser) else "")
        info["arm"] = self.arm.name if self.arm is not None else None
        info["base"] = self.base.name if self.base is not None else None
        return info

    @property
    def completion_model(self) -> LoadedModel:
        """The MDM the completion protocol runs on: the pre-trained base when one is loaded (fine-tuning on
        chats costs a small model its memory of the text), else the chat model itself."""
        return self.base or self.mdm

    def _completion_denoiser(self) -> Denoiser:
        return self._base_denoiser if self.base is not None else self.current_denoiser()

    def current_denoiser(self) -> Denoiser:
        with self._lock:
            return self.denoiser

    @cached_property
    def corpus(self) -> poems.PoemCorpus:
        """The sonnets, with the held-out split the MDM was trained with (the bundled split otherwise)."""
        return poems.PoemCorpus.for_card(self.mdm.card)

    @cached_property
    def decoding(self) -> poems.Decoding:
        """How the poem tab and the page's evaluation decode the MDM (its fine-tuning lengths, if any)."""
        return poems.Decoding.for_model(self.mdm.card, self.corpus, self.mdm.tokenizer)

    @property
    def answer_lengths(self) -> str:
        """Both tabs' default length search "MIN:MAX" (the SFT line lengths of a model trained here; "")."""
        from .generation import format_lengths

        return format_lengths(self.decoding.lengths) if self.decoding.lengths else ""

    @property
    def default_protocol(self) -> str:
        return poems.default_protocol(self.mdm.card)

    def default_settings(self) -> ChatSettings:
        """Chat defaults: one block of the fine-tuning answer length when known (what the model saw),
        searched over the answer lengths it was fine-tuned on."""
        if self.mdm.card.answer_slots:
            n = int(self.mdm.card.answer_slots)
            return ChatSettings(gen_length=n, steps=n, block_length=n, lengths=self.answer_lengths)
        return ChatSettings()

    def warm_up(self) -> float:
        """Answer one chat question and one poem with the default settings, so that the first visitor does
        not pay for the first call of every kernel (allocations, oneDNN / cuBLAS set-up) -> seconds taken."""
        started = time.perf_counter()
        settings = replace(self.default_settings(), animate=False)
        for _ in self.stream_chat([], "Hello", settings):
            pass
        line = self.corpus.split("train")[0].lines[0]
        for _ in self.stream_poem(line, "next", self.default_protocol, replace(settings, block_length=settings.gen_length,
                                                                                 lengths=self.answer_lengths)):
            pass
        return time.perf_counter() - started

    # ---- chat ----------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict], room: int) -> tuple[list[int], int]:
        """The conversation as prompt ids ending with the assistant header, within `room` tokens: the
        oldest exchanges (user + assistant) are left out until it fits -> (ids, exchanges left out).
        The last message always stays; if it alone does not fit, the sampler's check says so."""
        dropped = 0
        while True:
            ids = chat_prompt_ids(self.mdm.tokenizer, messages[2 * dropped:])
            if len(ids) <= room or len(messages) - 2 * dropped <= 1:
                return ids, dropped
            dropped += 1

    def stream_chat(self, history: list[dict], message: str, settings: ChatSettings,
                    should_stop: Callable[[], bool] | None = None) -> Iterator[Frame]:
        """Answer `message` after `history` ([{"role","content"}] of earlier turns), one Frame per shown step.
        Every check runs here, before the first frame: a refused request raises RequestError at once (so
        `stream_chat(...).close()` validates a request). `should_stop` is asked between steps; when it says
        yes the stream raises `Stopped`."""
        message = _text(message, "message", "Type a message first: the prompt is empty.")
        history = _history(history)
        messages = [*history, {"role": "user", "content": message}]
        gen_length = _whole(settings.gen_length, "gen length")
        prompt, dropped = self.chat_prompt(messages, self.current_denoiser().max_length - gen_length)
        note = f" · {dropped} oldest exchange{'s' * (dropped > 1)} left out to fit the context" if dropped else ""
        return self._stream_mdm_chat(prompt, settings, should_stop, note)

    # ---- reversal poem -------------------------------------------------------------------------
    def expected_line(self, line: str, direction: str) -> str | None:
        """The line that answers the question, when the line is in the sonnets or a known couplet."""
        if poems.is_chinese(line):
            key = poems.normalise(line)
            for first, second in CHINESE_COUPLETS:
                if direction == "next" and key == poems.normalise(first):
                    return second
                if direction == "previous" and key == poems.normalise(second):
                    return first
            return None
        return self.corpus.expected(line, direction)

    def stream_poem(self, line: str, direction: str, protocol: str, settings: ChatSettings,
                    should_stop: Callable[[], bool] | None = None) -> Iterator[PoemFrame]:
        """The MDM and the ARM answer the same question (chat) or fill the same canvas (completion) side
        by side, their steps interleaved. Checked before the first frame, as `stream_chat` is.
        `should_stop` is asked between steps; yes raises `Stopped`."""
        line = _text(line, "line", "Type a line of a poem first.")
        if not poems.given_line(line):
            raise RequestError("Type a line of a poem first.")
        if direction not in poems.DIRECTIONS:
            raise RequestError(f"direction must be one of {poems.DIRECTIONS}, not {direction!r}")
        if protocol not in poems.PROTOCOLS:
            raise RequestError(f"protocol must be one of {poems.PROTOCOLS}, not {protocol!r}")
        expected = self.expected_line(line, direction)
        if protocol == "chat":
            question = poems.ask(line, direction)
            messages = [{"role": "user", "content": question}]
            mdm = self._stream_mdm_chat(chat_prompt_ids(self.mdm.tokenizer, messages), settings, should_stop,
                                        given=line)
            arm = None if self.arm is None else self._stream_arm(
                chat_prompt_ids(self.arm.tokenizer, messages), settings.gen_length, settings, should_stop,
                _View([], self._chat_answer(self.arm)), stop_ids=sorted({self.arm.ids.eos, self.arm.ids.eot}))
        else:
            lengths = self._lengths(settings) or self.decoding.gap_lengths()
            gap = "[…]"
            question = f"{line}\n{gap}" if direction == "next" else f"{gap}\n{line}"
            mdm = self._stream_mdm_completion(line, direction, lengths, settings, should_stop)
            arm = None if self.arm is None else self._stream_arm_completion(line, direction, lengths, settings,
                                                                            should_stop)
        return _poem_frames(_interleave(mdm, arm), expected, question, protocol)

    # ---- race: one question, two decoders ------------------------------------------------------
    def stream_race(self, history: list[dict], message: str, settings: ChatSettings, rival: str,
                    should_stop: Callable[[], bool] | None = None) -> Iterator[tuple[Frame, Frame]]:
        """The same chat question answered twice, side by side, their steps interleaved: as `settings` say,
        and by a rival: another decoding mode (a key of DECODING_MODES), or RIVAL_BACKEND (the same mode
        on the other back end, once exported). Each side's stats count its own compute only."""
        message = _text(message, "message", "Type a message first: the prompt is empty.")
        messages = [*_history(history), {"role": "user", "content": message}]
        first = self.current_denoiser()
        if rival == RIVAL_BACKEND:
            second = self._onnx if first.name == "torch" else self._torch
            if second is None:
                raise RequestError("Export the model to ONNX first (Export tab) to race the two back ends.")
            rival_settings = settings
        elif rival in DECODING_MODES:
            second, rival_settings = first, replace(settings, mode=rival)
        else:
            raise RequestError(f"race against a decoding mode {list(DECODING_MODES)} or {RIVAL_BACKEND!r}, "
                               f"not {rival!r}")
        prompt, _ = self.chat_prompt(messages, min(first.max_length, second.max_length) -
                                     _whole(settings.gen_length, "gen length"))
        a = self._stream_mdm_chat(prompt, settings, should_stop, denoiser=first)
        b = self._stream_mdm_chat(prompt, rival_settings, should_stop, denoiser=second)
        return _interleave(a, b)

    def poem_result(self, pf: PoemFrame) -> dict:
        """The finished poem frame as plain data (for the API and the verdict line)."""
        def correct(frame):
            if frame is None or pf.expected is None:
                return None
            return poems.normalise(frame.text) == poems.normalise(pf.expected)

        info = None if pf.expected is None or poems.is_chinese(pf.expected) else self.corpus.lookup(pf.expected)
        return dict(protocol=pf.protocol, question=pf.question, expected=pf.expected,
                    held_out=None if info is None else info.held_out,
                    mdm=pf.mdm.text, arm=None if pf.arm is None else pf.arm.text,
                    mdm_correct=correct(pf.mdm), arm_correct=correct(pf.arm))

    # ---- evaluation ----------------------------------------------------------------------------
    def _jobs(self) -> list[tuple[LoadedModel, tuple[str, ...]]]:
        """Each model the page evaluates with the protocols it answers on the page."""
        jobs = [(self.base, ("completion",)), (self.mdm, ("chat",))] if self.base is not None else \
            [(self.mdm, poems.PROTOCOLS)]
        if self.arm is not None:
            jobs.append((self.arm, poems.PROTOCOLS))
        return [(m, tuple(p for p, _ in poems.evaluation_jobs(m, protos))) for m, protos in jobs]

    def _denoiser_for(self, loaded: LoadedModel) -> Denoiser:
        if loaded is self.arm:
            return self._arm_denoiser
        return self._base_denoiser if loaded is self.base else self.current_denoiser()

    @property
    def eval_limits(self) -> dict:
        """Line pairs per split of the page's evaluation (as the training run stores it, unless limited)."""
        if self.eval_limit is None:
            return dict(poems.STORED_LIMITS)
        return {split: self.eval_limit for split in poems.SPLITS}

    def stored_evaluation(self) -> tuple[list[poems.EvalResult], str]:
        """The results stored with the loaded models (by their training run, or `poems eval --store`), when
        they were computed for these weights and the page's settings -> (results, a note on what is missing)."""
        results, notes = [], []
        for loaded, protocols in self._jobs():
            key = poems.evaluation_key(loaded, self.decoding, self.eval_limits)
            try:
                stored = poems.stored_evaluation(loaded.folder, key)
            except poems.StaleEvaluation as e:
                notes.append(str(e))
                continue
            missing = [p for p in protocols if not any(r.protocol == p for r in stored or [])]
            if missing:
                notes.append(f"{loaded.name}: no stored {' or '.join(missing)} evaluation yet.")
            results += [r for r in stored or [] if r.protocol in protocols]
        return results, " ".join(notes)

    def evaluate(self, progress: Callable[[float, str], None] = lambda f, what: None,
                 should_stop: Callable[[], bool] | None = None) -> list[poems.EvalResult]:
        """Both protocols on the held-out sonnets, as the poem tab decodes (chat only for models that chat);
        the MDM through the running back end. `progress` moves with the work done (weighted by cost).
        One evaluation runs at a time (another request is refused at once, not queued); `should_stop` and
        `eval_time_limit_s` end it between two batches."""
        if not self._eval_lock.acquire(blocking=False):
            raise RequestError("An evaluation is already running (perhaps for another visitor); its figures "
                               "show on the page that asked. Try again when it ends.")
        try:
            started = time.perf_counter()

            def report(fraction: float, what: str) -> None:
                if should_stop is not None and should_stop():
                    raise Stopped(f"evaluation stopped at {100 * fraction:.0f}%")
                if time.perf_counter() - started > self.eval_time_limit_s:
                    raise RequestError(f"the evaluation ran past its time limit of {self.eval_time_limit_s:.0f} s "
                                       f"at {100 * fraction:.0f}%")
                progress(fraction, what)

            jobs = self._jobs()
            n = len(poems.line_pairs(self.corpus.split("heldout"), self.eval_limits["heldout"]))
            costs = [len(protocols) * poems.job_cost(m, self.decoding, n) for m, protocols in jobs]
            out, done = [], 0.0
            for (loaded, protocols), cost in zip(jobs, costs):
                out += poems.evaluate_all(loaded, self.corpus, protocols=protocols, decoding=self.decoding,
                                          denoiser=self._denoiser_for(loaded), limits=self.eval_limits,
                                          progress=lambda f, what: report((done + f * cost) / sum(costs), what))
                done += cost
            progress(1.0, "done")
            return out
        finally:
            self._eval_lock.release()

    def export_onnx(self, progress: Callable[[float, str], None] = lambda f, d: None) -> dict:
        """Export the MDM to ONNX once (cached by weight fingerprint, parity-checked) and keep its
        ONNX Runtime denoiser ready for `use_backend("onnx")`. -> the parity report (+ folder)."""
        import json

        from export.onnx_export import onnx_denoiser

        try:
            denoiser = onnx_denoiser(self.mdm, cache_root=self.onnx_cache, progress=progress)
        except RuntimeError as e:  # ExportError (e.g. parity past tolerance), OnnxBackendError
            raise RequestError(f"ONNX export failed: {e}") from e
        parity_file = Path(denoiser.folder) / "parity.json"
        report = json.loads(parity_file.read_text()) if parity_file.is_file() else {"passed": None}
        report["folder"] = str(denoiser.folder)
        report["supports_cache"] = denoiser.supports_cache
        self.set_onnx(denoiser)
        return report

    # ---- back ends -----------------------------------------------------------------------------
    def use_backend(self, name: str) -> Denoiser:
        """Switch the denoiser for new requests; running ones keep the one they started with."""
        if name == "torch":
            new = self._torch
        elif name == "onnx":
            if self._onnx is None:
                raise RequestError("Export the model to ONNX first (Export tab), then switch.")
            new = self._onnx
        else:
            raise RequestError(f"unknown back end {name!r}: use 'torch' or 'onnx'")
        with self._lock:
            self.denoiser = new
        return new

    def set_onnx(self, denoiser: Denoiser) -> None:
        self._onnx = denoiser

    # ---- internals -----------------------------------------------------------------------------
    def _generation_config(self, settings: ChatSettings, denoiser: Denoiser, prompt_length: int):
        from .generation import GenerationConfig, parse_constraints

        if settings.mode not in DECODING_MODES:
            raise RequestError(f"unknown decoding mode {settings.mode!r}; choose one of {list(DECODING_MODES)}")
        for name in ("gen_length", "steps", "block_length"):
            _whole(getattr(settings, name), name.replace("_", " "))
        for name in ("temperature", "cfg_scale", "threshold", "pace_ms"):
            _number(getattr(settings, name), name.replace("_", " "))
        use_tau, cache = DECODING_MODES[settings.mode]
        try:
            constraints = parse_constraints(settings.constraints or "", self.mdm.tokenizer) or None
        except ValueError as e:
            raise RequestError(f"word constraints: {e}") from None
        config = GenerationConfig(
            gen_length=int(settings.gen_length), block_length=int(settings.block_length), steps=int(settings.steps),
            temperature=float(settings.temperature), cfg_scale=float(settings.cfg_scale),
            remasking=settings.remasking, threshold=float(settings.threshold) if use_tau else None,
            cache=cache, constraints=constraints, seed=settings.seed)
        try:
            config.validate(denoiser.max_length, prompt_length, supports_cache=denoiser.supports_cache)
        except ValueError as e:  # the sampler's own checks, in words (divisibility, context, cache, ...)
            raise RequestError(str(e)) from None
        return config

    @staticmethod
    def _lengths(settings: ChatSettings) -> range | None:
        from .generation import parse_lengths

        try:
            return parse_lengths(settings.lengths)
        except ValueError as e:
            raise RequestError(f"length search: {e}") from None

    def _chat_answer(self, model: LoadedModel) -> Callable[[list[int], list[int]], str]:
        return lambda tokens, canvas: decode_answer(model.tokenizer, tokens, model.ids)

    def _stream_mdm_chat(self, prompt: list[int], settings: ChatSettings,
                         should_stop: Callable[[], bool] | None = None, note: str = "",
                         denoiser: Denoiser | None = None, given: str | None = None) -> Iterator[Frame]:
        """A length search keeps its candidate as the poem task's chat protocol does (`poems.chat_steps`;
        `given`: the line a poem question asks about)."""
        from .generation import initial_sequence, sample_steps

        denoiser = denoiser or self.current_denoiser()  # kept for the whole request, whatever the Export tab does
        config = self._generation_config(settings, denoiser, len(prompt))
        ids = self.mdm.ids
        prompt_ids = torch.tensor([prompt], dtype=torch.long, device=denoiser.device)  # [1, P]
        lengths = self._lengths(settings)
        try:
            if lengths:
                steps = poems.chat_steps(denoiser, self.mdm.tokenizer, ids, prompt_ids, None, config,
                                         replace(self.decoding, lengths=lengths), None if given is None else [given])
            else:
                steps = sample_steps(denoiser, prompt_ids, None, config, mask_id=ids.mask, eos_id=ids.eos,
                                     eot_id=ids.eot)
        except ValueError as e:
            raise RequestError(f"length search: {e}" if lengths else str(e)) from None
        blank = initial_sequence(prompt_ids, config, ids.mask)[0, len(prompt):].tolist()  # masks + forced words
        kept = _KEPT if self.decoding.likelihood_samples else ""
        note = (f" · length search {lengths.start}–{lengths.stop - 1} tokens{kept}" if lengths else "") + note
        return self._frames(steps, self.mdm, denoiser.name, settings, _View(blank, self._chat_answer(self.mdm)),
                            should_stop, note)

    def _stream_mdm_completion(self, line: str, direction: str, lengths: range, settings: ChatSettings,
                               should_stop: Callable[[], bool] | None) -> Iterator[Frame]:
        model, denoiser = self.completion_model, self._completion_denoiser()
        tok, ids = model.tokenizer, model.ids
        longest = len(poems.completion_canvas(tok, ids, line, direction, max(lengths)))
        if longest > denoiser.max_length:
            raise RequestError(f"the line is too long: with a gap of up to {max(lengths)} tokens its canvas is "
                               f"{longest} tokens, over the model's context of {denoiser.max_length}")
        try:
            steps = poems.completion_steps(denoiser, tok, ids, [line], direction,
                                           replace(self.decoding, lengths=lengths))
        except ValueError as e:
            raise RequestError(str(e)) from None
        blank = poems.completion_canvas(tok, ids, line, direction, min(lengths))[1:]
        view = _View(blank, lambda tokens, canvas: poems.gap_text(tok, ids, tokens, canvas, line))
        kept = _KEPT if self.decoding.likelihood_samples else ""
        note = f" · gap length searched {lengths.start}–{lengths.stop - 1} tokens{kept} · {model.name}"
        return self._frames(steps, model, denoiser.name, settings, view, should_stop, note)

    def _stream_arm_completion(self, line: str, direction: str, lengths: range, settings: ChatSettings,
                               should_stop: Callable[[], bool] | None) -> Iterator[Frame]:
        """The same canvas, read left to right: the ARM sees only what comes before the gap."""
        tok, ids = self.arm.tokenizer, self.arm.ids
        canvas = poems.completion_canvas(tok, ids, line, direction, max(lengths))
        prompt, gap = poems.arm_completion_prompt(canvas, ids.mask)
        sep = poems.text_format(line).sep
        # What follows the gap, less the separator (the ARM writes its own, as its stop) and the closing EOS.
        after = canvas[len(prompt) + gap + len(tok(sep, add_special_tokens=False)["input_ids"]):-1]

        view = _View([], lambda tokens, _canvas: poems.arm_gap_text(tok, tokens, line), causal=True,
                     before=prompt[1:], after=after)
        return self._stream_arm(prompt, gap + 1, settings, should_stop, view, stop_ids=poems.arm_stop_ids(tok, ids, line))

    def _stream_arm(self, prompt: list[int], max_new: int, settings: ChatSettings,
                    should_stop: Callable[[], bool] | None, view: _View, stop_ids: Sequence[int]) -> Iterator[Frame]:
        from .generation import arm_steps

        den = self._arm_denoiser
        max_new = _whole(max_new, "gen length")
        if len(prompt) + max_new > den.max_length:
            raise RequestError(f"the prompt is {len(prompt)} tokens; with {max_new} new tokens that exceeds the "
                               f"autoregressive model's context of {den.max_length}")
        prompt_ids = torch.tensor([prompt], dtype=torch.long, device=den.device)  # [1, P]
        steps = arm_steps(den, prompt_ids, None, max_new_tokens=max_new, stop_ids=stop_ids)
        view.causal = True
        return self._frames(steps, self.arm, "torch", settings, view, should_stop)

    def _frames(self, steps, model: LoadedModel, backend: str, settings: ChatSettings, view: _View,
                should_stop: Callable[[], bool] | None = None, note: str = "") -> Iterator[Frame]:
        """Run a Step stream, yielding display frames (throttled), the first one before any forward pass.

        With `settings.pace_ms` the next step waits until that long after the previous one, so that a
        tiny model's animation can be followed by eye; the waiting is not counted in tokens/s."""
        animate = settings.animate
        pace_s = settings.pace_ms / 1000 if animate else 0.0
        blank = render_canvas(model.tokenizer, model.ids, view.blank, canvas=view.blank, causal=view.causal,
                              cursor=view.causal, before=view.before, after=view.after)
        yield Frame(blank, "", 0, 0, False, f"{'decoding' if view.causal else 'denoising'}… · back end: {backend}")
        started, compute, last_shown, step = time.perf_counter(), 0.0, 0.0, None
        t0 = started
        try:
            while True:
                if pace_s:
                    time.sleep(max(0.0, pace_s - (time.perf_counter() - t0)))
                t0 = time.perf_counter()
                step = next(steps, None)
                compute += time.perf_counter() - t0
                if step is None:
                    break
                if should_stop is not None and should_stop():
                    raise Stopped(f"stopped at step {step.step}")
                if time.perf_counter() - started > self.time_limit_s:
                    raise RequestError(f"stopped at step {step.step}: the request ran past the time limit of "
                                       f"{self.time_limit_s:.0f} s. Lower the gen length or the steps.")
                now = time.perf_counter()
                if step.done:
                    break
                if animate and now - last_shown >= self.frame_interval_s:
                    last_shown = now
                    yield self._frame(step, model, backend, compute, view, note)
        finally:
            steps.close()  # Stop / a closed page: no forward pass runs after this
        if step is None:
            raise RuntimeError("the sampler finished without a final step")
        step.done = True  # the stream is over, whatever its last step said
        yield self._frame(step, model, backend, compute, view, note)

    def _frame(self, step, model: LoadedModel, backend: str, compute_s: float, view: _View, note: str) -> Frame:
        P = step.prompt_length
        tokens = step.ids[0, P:].tolist()
        revealed = step.revealed[0, P:].tolist()
        conf = step.confidence[0, P:].tolist()
        canvas = step.canvas[0, P:].tolist() if step.canvas is not None else None
        if canvas is not None:  # what is shown: up to the first end-of-text after the last slot
            end = _visible_end(canvas, model.ids)
            tokens, revealed, conf, canvas = tokens[:end], revealed[:end], conf[:end], canvas[:end]
        page = render_canvas(model.tokenizer, model.ids, tokens, revealed=revealed, confidence=conf, canvas=canvas,
                             causal=view.causal, cursor=view.causal and not step.done, before=view.before,
                             after=view.after)
        text = view.answer(tokens, canvas or tokens)
        decided = sum(t != model.ids.mask for t, c in zip(tokens, canvas or tokens) if c == model.ids.mask) \
            if canvas is not None else len(tokens)
        tps = decided / compute_s if compute_s > 0 else float("inf")
        words = "done" if step.done else f"step {step.step}"
        stats = (f"{words} · NFE {step.nfe} · {compute_s:.2f} s · {tps:.1f} tokens/s · {decided} tokens · "
                 f"back end: {backend}{note}")
        return Frame(page, text, step.step, step.nfe, step.done, stats)


def _text(value, what: str, empty: str) -> str:
    """A piece of text from a request, stripped: RequestError when it is not text, empty, or not valid
    Unicode (a lone surrogate cannot be tokenized)."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise RequestError(f"the {what} must be text, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"the {what} holds characters that are not valid text (a lone surrogate)") from None
    value = value.strip()
    if not value:
        raise RequestError(empty)
    return value


def _history(history) -> list[dict]:
    """A conversation from a request: [{"role": "user"|"assistant", "content": str}], checked."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise RequestError("the conversation must be a list of messages")
    out = []
    for m in history:
        if not (isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)):
            raise RequestError("each message of the conversation needs a role (user/assistant) and text content")
        if m["role"] == "assistant" and not m["content"].strip():
            out.append({"role": "assistant", "content": ""})  # the model ended its answer at once
        else:
            out.append({"role": m["role"], "content": _text(m["content"], "conversation", "an earlier message is empty")})
    return out


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(f"{what} must be a finite number, not {value!r}")
    return float(value)


def _whole(value, what: str) -> int:
    if _number(value, what) != int(value) or value < 1:
        raise RequestError(f"{what} must be a whole number ≥ 1, not {value!r}")
    return int(value)


def _interleave(a: Iterator[Frame], b: Iterator[Frame] | None) -> Iterator[tuple[Frame, Frame | None]]:
    """Two frame streams advanced one step each in turn -> (latest of a, latest of b) after every turn;
    closing the result closes both (no forward pass runs after a Stop)."""
    last, running = [None, None], [a, b]
    try:
        while any(running):
            for side, gen in enumerate(running):
                if gen is None:
                    continue
                frame = next(gen, None)
                if frame is not None:
                    last[side] = frame
                if frame is None or frame.done:
                    gen.close()
                    running[side] = None
            yield last[0], last[1]
    finally:
        for gen in running:
            if gen is not None:
                gen.close()


def _poem_frames(frames, expected, question, protocol) -> Iterator[PoemFrame]:
    try:
        for mdm, arm in frames:
            yield PoemFrame(mdm, arm, expected, question, protocol)
    finally:
        frames.close()


def _visible_end(canvas: list[int], ids) -> int:
    """One past the first end-of-text token after the canvas's last MASK slot (the padding after it is
    not shown); the whole canvas when it ends without one."""
    slots = [i for i, t in enumerate(canvas) if t == ids.mask]
    start = slots[-1] + 1 if slots else 0
    for i in range(start, len(canvas)):
        if canvas[i] in (ids.eos, ids.eot):
            return i + 1
    return len(canvas)


# ---- display helpers ---------------------------------------------------------------------------
def confidence_colour(c: float) -> str:
    """Low confidence warm (red/orange), high confidence green."""
    c = min(max(c, 0.0), 1.0)
    return f"hsla({int(10 + 110 * c)}, 85%, 45%, 0.30)"


MASK_GLYPH = "░"
CURSOR = '<span class="ld-cursor">▌</span>'


def render_canvas(tokenizer, ids, tokens: list[int], *, revealed: list[bool] | None = None,
                  confidence: list[float] | None = None, canvas: list[int] | None = None, causal: bool = False,
                  cursor: bool = False, before: Sequence[int] = (), after: Sequence[int] = ()) -> str:
    """Answer slots -> HTML. Masks as ░, end of text as ·, tokens revealed in this step coloured by their
    confidence, given text (not a MASK slot of `canvas`: a poem's given line, forced words) in its own
    style. A causal answer ends at its stop token, between the given `before` and `after` tokens (which
    it cannot see). Runs of tokens with the same status are decoded together, so multi-byte characters
    split over tokens still read right."""
    revealed = revealed or [False] * len(tokens)
    confidence = confidence or [0.0] * len(tokens)
    stop = {ids.eos, ids.eot}

    def status(i: int) -> str:
        t = tokens[i]
        if t == ids.mask:
            return "mask"
        if t in stop:
            return "eos"
        if revealed[i]:
            return "new"
        if canvas is not None and i < len(canvas) and canvas[i] != ids.mask:
            return "given"
        return "plain"

    def text(toks) -> str:
        return _escape(tokenizer.decode(list(toks), skip_special_tokens=False))

    parts = [f'<span class="ld-given">{text(before)}</span>'] if before else []
    i = 0
    while i < len(tokens):
        kind, j = status(i), i + 1
        if kind == "new":
            title = f"confidence {confidence[i]:.2f}"
            parts.append(f'<span class="ld-new" style="background:{confidence_colour(confidence[i])}" '
                         f'title="{title}">{text(tokens[i:j])}</span>')
        elif kind == "eos":
            parts.append(f'<span class="{"ld-eos ld-new" if revealed[i] else "ld-eos"}" title="end of text">·</span>')
            if causal:  # an autoregressive answer ends at its stop token
                break
        else:
            while j < len(tokens) and status(j) == kind:
                j += 1
            if kind == "mask":
                parts.append(f'<span class="ld-mask">{MASK_GLYPH * (j - i)}</span>')
            elif kind == "given":
                parts.append(f'<span class="ld-given">{text(tokens[i:j])}</span>')
            else:
                parts.append(text(tokens[i:j]))
        i = j
    if cursor:
        parts.append(CURSOR)
    if after:
        parts.append(f'<span class="ld-given ld-unseen" title="given after the gap: a left-to-right model '
                     f'cannot see it">{text(after)}</span>')
    return f'<div class="ld-canvas">{"".join(parts)}</div>'


def mask_count(page: str) -> int:
    return page.count(MASK_GLYPH)


def _escape(text: str) -> str:
    return html.escape(text).replace("\n", "<br>")


# ---- building a studio from the command line ---------------------------------------------------
SMALL_MODEL = 50_000_000  # parameters; below this a CPU runs the model fastest on one thread


def cpu_threads(mdm: LoadedModel, requested: int) -> int:
    """Threads for torch on the CPU: `requested`, or with 0 ("auto") one thread for a small model,
    whose matrices are too small to split (extra threads mostly wait on each other, and far worse
    when other processes share the cores), and torch's default for a big one."""
    if requested > 0:
        return requested
    small = sum(p.numel() for p in mdm.model.parameters()) < SMALL_MODEL
    return 1 if small and mdm.device.type == "cpu" else torch.get_num_threads()


def build_studio(model: str, arm: str | None, backend: str = "torch", onnx_dir: str | None = None,
                 device: str = "auto", threads: int | None = None, progress: Callable[[str], None] = print,
                 base: str | None = None, compile: str = "off", **kwargs) -> Studio:
    """Load the models named on the command line; an ARM or a base model that cannot be loaded only
    disables what needs it (with a note). `threads`: torch CPU threads (0: auto, see `cpu_threads`; None:
    leave torch's setting alone). `compile`: "on", "off" or "auto" (the captured path on CUDA only)."""
    from .loading import ModelLoadError, load_model

    progress(f"loading {model} …")
    mdm = load_model(model, device=device)
    if threads is not None:
        torch.set_num_threads(cpu_threads(mdm, threads))  # before an ONNX session copies the setting
    twin, note = None, ""
    if arm:
        try:
            progress(f"loading the autoregressive twin {arm} …")
            twin = load_model(arm, device=device)
            if not twin.card.causal:
                twin, note = None, f"No autoregressive twin: {arm} is a masked-diffusion model (causal=false)."
        except ModelLoadError as e:
            note = f"No autoregressive twin: {e}"
        if note:
            progress(note)
    else:
        note = "No autoregressive twin loaded (start the app with --arm DIR to compare)."
    base_model = None
    if base:
        try:
            progress(f"loading the pre-trained base {base} …")
            base_model = load_model(base, device=device)
            if base_model.card.causal:
                raise ModelLoadError(f"{base} is a causal (autoregressive) model, not a masked-diffusion base")
        except ModelLoadError as e:
            base_model = None
            progress(f"No base model (completion runs on {model}): {e}")
    if compile not in ("auto", "on", "off"):
        raise ModelLoadError(f"compile must be 'auto', 'on' or 'off', got {compile!r}")
    compiled = compile == "on" or (compile == "auto" and mdm.device.type == "cuda")
    studio = Studio(mdm, twin, base=base_model, arm_note=note, compiled=compiled, **kwargs)
    if backend != "torch":
        from export.onnx_export import onnx_denoiser

        if backend != "onnx":
            raise ModelLoadError(f"unknown back end {backend!r}; use 'torch' or 'onnx'")
        progress(f"preparing the {backend} back end …")
        last = [-1]

        def report(fraction: float, what: str):
            if int(fraction * 10) != last[0]:  # a line per 10%, not per tick
                last[0] = int(fraction * 10)
                progress(f"  {100 * fraction:3.0f}% {what}")

        try:
            studio.set_onnx(onnx_denoiser(mdm, onnx_dir=onnx_dir, cache_root=studio.onnx_cache, progress=report))
        except RuntimeError as e:  # OnnxBackendError, ExportError
            raise ModelLoadError(f"cannot use the {backend} back end: {e}") from None
        studio.use_backend(backend)
    return studio
