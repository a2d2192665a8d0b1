"""The model-facing side of the app: prompts, sampling streams, display frames, back-end switching.

The Gradio page (`ui.py`) only turns widgets into a `ChatSettings` and shows the `Frame`s that this
module yields; everything it knows about sampling is the `Step` stream of `generation.py`, rendered
here into HTML: masks as masks, the tokens revealed in this step highlighted and coloured by their
confidence, earlier ones plain.

One `Studio` serves every browser session: it holds no conversation (the page keeps each session's
history in its own `gr.State`), only the models and the current denoiser, which a lock lets the
Export tab swap while requests that already started finish on the denoiser they began with.
"""
from __future__ import annotations

import html
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from . import poems
from .backends import Denoiser, TorchDenoiser
from .loading import BUNDLED_MODELS, LoadedModel
from .tokenization import chat_prompt_ids, decode_answer

DECODING_MODES = {  # UI label -> (uses the threshold τ, cache)
    "vanilla": (False, "none"),
    "parallel threshold τ": (True, "none"),
    "prefix cache": (False, "prefix"),
    "dual cache": (False, "dual"),
    "threshold + dual cache": (True, "dual"),
}
REMASKING = ("low_confidence", "random")
DIRECTIONS = ("next", "previous")

# The LLaDA paper's couplet prompts (DESIGN §5), used when the line is Chinese, and a few famous
# couplets (first line, second line) for users who load LLaDA-8B-Instruct.
CHINESE_QUESTIONS = {"next": "{line}的下一句是什么？直接输出句子即可。",
                     "previous": "{line}的上一句是什么？直接输出句子即可。"}
CHINESE_COUPLETS = [("床前明月光", "疑是地上霜"), ("举头望明月", "低头思故乡"),  # Li Bai, 静夜思
                    ("白日依山尽", "黄河入海流"), ("欲穷千里目", "更上一层楼"),  # Wang Zhihuan, 登鹳雀楼
                    ("海内存知己", "天涯若比邻")]  # Wang Bo


class RequestError(ValueError):
    """A request the studio refuses, with a message meant for the person who sent it."""


class Stopped(Exception):
    """The person pressed Stop: the stream ended between two steps, nothing is left running."""


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
    lengths: str = ""  # length search "MIN:MAX": decode every answer length in tokens, keep the most confident
    seed: int | None = None  # for temperature > 0 / random remasking


@dataclass
class Frame:
    """What the page shows of one answer at one moment."""

    html: str  # the canvas: masks, this step's tokens coloured by confidence, earlier tokens plain
    text: str  # the answer decoded up to EOS/EoT (the final answer once done)
    masks: int  # masked positions left
    step: int
    nfe: int
    done: bool
    stats: str  # "NFE · tokens/s · back end" line


@dataclass
class PoemFrame:
    mdm: Frame
    arm: Frame | None  # None when no autoregressive twin is loaded
    expected: str | None  # the corpus line that answers the question, when the line is in the corpus
    question: str


@dataclass
class Studio:
    mdm: LoadedModel
    arm: LoadedModel | None = None
    denoiser: Denoiser | None = None  # None: a TorchDenoiser over mdm.model
    arm_note: str = ""  # why there is no ARM, shown in the poem tab
    model_path: str | None = None  # the MDM's folder (its training_meta.json gives the held-out split)
    eval_limit: int | None = None  # line pairs per direction in the page's evaluation (None: all)
    time_limit_s: float = 120.0  # per request; the stream stops with an error past it
    frame_interval_s: float = 1 / 30  # at most this many frames per second reach the page
    onnx_cache: Path | None = None  # root of the ONNX export cache (None: export's default)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _onnx: Denoiser | None = field(default=None, repr=False)
    _torch: Denoiser | None = field(default=None, repr=False)

    def __post_init__(self):
        self._torch = TorchDenoiser(self.mdm.model)
        if self.denoiser is None:
            self.denoiser = self._torch
        elif self.denoiser.name == "onnx":
            self._onnx = self.denoiser
        self._arm_denoiser = TorchDenoiser(self.arm.model) if self.arm is not None else None

    # ---- model panel -------------------------------------------------------------------------
    def describe(self) -> dict:
        info = self.mdm.describe()
        info["backend"] = self.current_denoiser().name
        info["arm"] = self.arm.name if self.arm is not None else None
        return info

    def current_denoiser(self) -> Denoiser:
        with self._lock:
            return self.denoiser

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
        `should_stop` is asked between steps; when it says yes the stream raises `Stopped`."""
        message = (message or "").strip()
        if not message:
            raise RequestError("Type a message first: the prompt is empty.")
        messages = [*history, {"role": "user", "content": message}]
        prompt, dropped = self.chat_prompt(messages, self.current_denoiser().max_length - int(settings.gen_length))
        for frame in self._stream_mdm(prompt, settings, should_stop):
            if dropped:
                frame.stats += f" · {dropped} oldest exchange{'s' * (dropped > 1)} left out to fit the context"
            yield frame

    # ---- reversal poem -------------------------------------------------------------------------
    def poem_question(self, line: str, direction: str) -> str:
        line = (line or "").strip()
        if not line:
            raise RequestError("Type a line of a poem first.")
        if direction not in DIRECTIONS:
            raise RequestError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
        if _is_chinese(line):
            return CHINESE_QUESTIONS[direction].format(line=line)
        return poems.question(line, direction)

    @cached_property
    def corpus(self) -> "poems.PoemCorpus":
        """The sonnets, with the held-out split recorded in the model folder (the default split otherwise)."""
        folder = self.model_path if self.model_path and Path(self.model_path).is_dir() else None
        return poems.PoemCorpus.for_model(folder)

    @cached_property
    def answer_slots(self) -> int | None:
        """The answer length the model was fine-tuned with (its training_meta.json), if it says so."""
        meta = Path(self.model_path or "") / poems.TRAINING_META
        if not (self.model_path and meta.is_file()):
            return None
        return json.loads(meta.read_text()).get("config", {}).get("answer_slots")

    @cached_property
    def answer_lengths(self) -> str:
        """The default length search of both tabs, "MIN:MAX": the line lengths of the model's SFT sonnets
        (models trained here); "" (one fixed gen length) for other models."""
        if not self.answer_slots:
            return ""
        from .generation import format_lengths

        return format_lengths(poems.sft_line_lengths(self.corpus, self.mdm.tokenizer))

    def default_settings(self) -> ChatSettings:
        """Chat defaults: one block of the fine-tuning answer length when known (what the model saw),
        searched over the answer lengths it was fine-tuned on."""
        if self.answer_slots:
            n = int(self.answer_slots)
            return ChatSettings(gen_length=n, steps=n, block_length=n, lengths=self.answer_lengths)
        return ChatSettings()

    def expected_line(self, line: str, direction: str) -> str | None:
        """The corpus line that answers the question, or None when the line is not in the sonnets."""
        if direction not in DIRECTIONS:
            return None
        if _is_chinese(line):
            key = poems.normalise(line)
            for first, second in CHINESE_COUPLETS:
                if direction == "next" and key == first:
                    return second
                if direction == "previous" and key == second:
                    return first
            return None
        return self.corpus.expected(line, direction)

    def stream_poem(self, line: str, direction: str, settings: ChatSettings,
                    should_stop: Callable[[], bool] | None = None) -> Iterator[PoemFrame]:
        """The MDM and the ARM answer the same question side by side, their steps interleaved.
        `should_stop` is asked between steps; when it says yes the stream raises `Stopped`."""
        question = self.poem_question(line, direction)
        expected = self.expected_line(line, direction)
        messages = [{"role": "user", "content": question}]
        mdm = self._stream_mdm(chat_prompt_ids(self.mdm.tokenizer, messages), settings, should_stop)
        arm = None
        if self.arm is not None:
            arm = self._stream_arm(chat_prompt_ids(self.arm.tokenizer, messages), settings, should_stop)
        last = {"mdm": None, "arm": None}
        running = {"mdm": mdm, "arm": arm}
        try:
            while any(running.values()):
                for side, gen in running.items():
                    if gen is None:
                        continue
                    frame = next(gen, None)
                    if frame is not None:
                        last[side] = frame
                    if frame is None or frame.done:
                        gen.close()
                        running[side] = None
                yield PoemFrame(last["mdm"], last["arm"], expected, question)
        finally:
            for gen in running.values():
                if gen is not None:
                    gen.close()

    def poem_result(self, pf: PoemFrame) -> dict:
        """The finished poem frame as plain data (for the API and the verdict line)."""
        def correct(frame):
            if frame is None or pf.expected is None:
                return None
            return poems.normalise(frame.text) == poems.normalise(pf.expected)

        info = None if pf.expected is None or _is_chinese(pf.expected) else self.corpus.lookup(pf.expected)
        return dict(question=pf.question, expected=pf.expected,
                    held_out=None if info is None else info.held_out,
                    mdm=pf.mdm.text, arm=None if pf.arm is None else pf.arm.text,
                    mdm_correct=correct(pf.mdm), arm_correct=correct(pf.arm))

    def evaluate(self, split: str = "heldout", limit: int | None = None,
                 progress: Callable[[float, str], None] = lambda f, d: None) -> list[dict]:
        """The training issue's forward / reversal evaluation for the MDM and (if loaded) the ARM, in %.
        The MDM decodes as the poem tab does by default (with its length search, if any)."""
        from .generation import parse_lengths

        limit = limit if limit is not None else self.eval_limit
        gen_length = self.answer_slots or poems.GEN_LENGTH
        lengths = parse_lengths(self.answer_lengths)
        models = [("MDM", self.mdm)] + ([("ARM", self.arm)] if self.arm is not None else [])
        rows = []
        for k, (kind, loaded) in enumerate(models):
            what = f"evaluating the {kind} ({loaded.name}) on the {split} sonnets"
            progress(k / len(models), what)
            search = lengths if kind == "MDM" else None
            name = loaded.name + (f", length search {self.answer_lengths}" if search else "")
            r = poems.evaluate(loaded.model, loaded.tokenizer, loaded.ids, self.corpus, split, limit,
                               name=f"{name} [{kind}]", gen_length=gen_length, multiturn=False,
                               length_search=search, progress=lambda f: progress((k + f) / len(models), what))
            rows.append(dict(model=r.model, forward=round(100 * r.forward, 1), reversal=round(100 * r.reversal, 1),
                             pairs=r.n_pairs))
        progress(1.0, "done")
        return rows

    def export_onnx(self, progress: Callable[[float, str], None] = lambda f, d: None) -> dict:
        """Export the MDM to ONNX once (cached by weight fingerprint, parity-checked) and keep its
        ONNX Runtime denoiser ready for `use_backend("onnx")`. -> the parity report (+ folder)."""
        from .backends import build_denoiser

        try:
            denoiser = build_denoiser(self.mdm, "onnx", cache_root=self.onnx_cache, progress=progress)
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
            value = getattr(settings, name)
            if int(value) != value or value < 1:
                raise RequestError(f"{name.replace('_', ' ')} must be a whole number ≥ 1, not {value}")
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

    def _stream_mdm(self, prompt: list[int], settings: ChatSettings,
                    should_stop: Callable[[], bool] | None = None) -> Iterator[Frame]:
        from .generation import initial_sequence, length_search_steps, parse_lengths, sample_steps

        denoiser = self.current_denoiser()  # kept for the whole request, whatever the Export tab does
        config = self._generation_config(settings, denoiser, len(prompt))
        ids = self.mdm.ids
        prompt_ids = torch.tensor([prompt], dtype=torch.long, device=denoiser.device)  # [1, P]
        try:
            lengths = parse_lengths(settings.lengths)
            if lengths:
                steps = length_search_steps(denoiser, prompt_ids, None, config, lengths, mask_id=ids.mask,
                                            eos_id=ids.eos, eot_id=ids.eot)
        except ValueError as e:
            raise RequestError(f"length search: {e}") from None
        if not lengths:
            steps = sample_steps(denoiser, prompt_ids, None, config, mask_id=ids.mask, eos_id=ids.eos, eot_id=ids.eot)
        canvas = initial_sequence(prompt_ids, config, ids.mask)[0, len(prompt):].tolist()  # masks + forced words
        for frame in self._frames(steps, self.mdm, denoiser.name, settings, canvas, should_stop):
            if lengths:
                frame.stats += f" · length search {lengths.start}–{lengths.stop - 1} tokens"
            yield frame

    def _stream_arm(self, prompt: list[int], settings: ChatSettings,
                    should_stop: Callable[[], bool] | None = None) -> Iterator[Frame]:
        from .generation import arm_steps

        den = self._arm_denoiser
        max_new = int(settings.gen_length)
        if len(prompt) + max_new > den.max_length:
            raise RequestError(f"the prompt is {len(prompt)} tokens; with {max_new} new tokens that exceeds the "
                               f"autoregressive model's context of {den.max_length}")
        prompt_ids = torch.tensor([prompt], dtype=torch.long, device=den.device)  # [1, P]
        ids = self.arm.ids
        steps = arm_steps(den, prompt_ids, None, max_new_tokens=max_new, stop_ids=sorted({ids.eos, ids.eot}))
        yield from self._frames(steps, self.arm, "torch", settings, [], should_stop)

    def _frames(self, steps, model: LoadedModel, backend: str, settings: ChatSettings, canvas: list[int],
                should_stop: Callable[[], bool] | None = None) -> Iterator[Frame]:
        """Run a Step stream, yielding display frames (throttled), the first one before any forward pass.

        With `settings.pace_ms` the next step waits until that long after the previous one, so that a
        tiny model's animation can be followed by eye; the waiting is not counted in tokens/s."""
        animate = settings.animate
        pace_s = settings.pace_ms / 1000 if animate else 0.0
        causal = model is self.arm
        if causal:  # an autoregressive answer grows from nothing
            blank, masks = f'<div class="ld-canvas">{CURSOR}</div>', 0
        else:
            blank, masks = render_canvas(model.tokenizer, canvas, None, None, model.ids)
        yield Frame(blank, "", masks, 0, 0, False, f"{'decoding' if causal else 'denoising'}… · back end: {backend}")
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
                    yield self._frame(step, model, backend, compute, causal)
        finally:
            steps.close()  # Stop / a closed page: no forward pass runs after this
        if step is None:
            raise RuntimeError("the sampler finished without a final step")
        step.done = True  # the stream is over, whatever its last step said
        yield self._frame(step, model, backend, compute, causal)

    def _frame(self, step, model: LoadedModel, backend: str, compute_s: float, causal: bool) -> Frame:
        answer = step.ids[0, step.prompt_length:].tolist()
        revealed = step.revealed[0, step.prompt_length:].tolist()
        conf = step.confidence[0, step.prompt_length:].tolist()
        page, masks = render_canvas(model.tokenizer, answer, revealed, conf, model.ids, causal=causal,
                                    cursor=causal and not step.done)
        text = decode_answer(model.tokenizer, answer, model.ids)
        decided = len(answer) - masks  # answer slots fixed so far (end-of-text padding included)
        tps = decided / compute_s if compute_s > 0 else float("inf")
        words = "done" if step.done else f"step {step.step}"
        stats = f"{words} · NFE {step.nfe} · {tps:.1f} tokens/s · {decided} tokens · back end: {backend}"
        return Frame(page, text, masks, step.step, step.nfe, step.done, stats)


# ---- display helpers ---------------------------------------------------------------------------
def confidence_colour(c: float) -> str:
    """Low confidence warm (red/orange), high confidence green."""
    c = min(max(c, 0.0), 1.0)
    return f"hsla({int(10 + 110 * c)}, 85%, 45%, 0.30)"


MASK_GLYPH = "░"
CURSOR = '<span class="ld-cursor">▌</span>'


def render_canvas(tokenizer, answer: list[int], revealed: list[bool] | None, confidence: list[float] | None,
                  ids, causal: bool = False, cursor: bool = False) -> tuple[str, int]:
    """Answer slots -> (HTML, number of masks). Runs of tokens with the same status are decoded together,
    so multi-byte characters split over tokens still read right."""
    revealed = revealed or [False] * len(answer)
    confidence = confidence or [0.0] * len(answer)
    parts, masks, i = [], 0, 0
    stop = {ids.eos, ids.eot}
    while i < len(answer):
        t = answer[i]
        if t == ids.mask:
            j = i
            while j < len(answer) and answer[j] == ids.mask:
                j += 1
            masks += j - i
            parts.append(f'<span class="ld-mask">{MASK_GLYPH * (j - i)}</span>')
        elif t in stop:
            j = i + 1
            cls = "ld-eos ld-new" if revealed[i] else "ld-eos"
            parts.append(f'<span class="{cls}" title="end of text">·</span>')
            if causal:  # an autoregressive answer ends at its stop token
                break
        elif revealed[i]:
            j = i + 1
            text = _escape(tokenizer.decode([t], skip_special_tokens=False))
            title = f"confidence {confidence[i]:.2f}"
            parts.append(f'<span class="ld-new" style="background:{confidence_colour(confidence[i])}" '
                         f'title="{title}">{text}</span>')
        else:
            j = i
            while j < len(answer) and answer[j] != ids.mask and answer[j] not in stop and not revealed[j]:
                j += 1
            parts.append(_escape(tokenizer.decode(answer[i:j], skip_special_tokens=False)))
        i = j
    if cursor:
        parts.append(CURSOR)
    return f'<div class="ld-canvas">{"".join(parts)}</div>', masks


def _escape(text: str) -> str:
    return html.escape(text).replace("\n", "<br>")


def _is_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


# ---- building a studio from the command line ---------------------------------------------------
DEFAULT_ARM = str(BUNDLED_MODELS / "sonnets-arm")


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
                 **kwargs) -> Studio:
    """Load the models named on the command line; an ARM that cannot be loaded only disables the comparison.
    `threads`: torch CPU threads (0: auto, see `cpu_threads`; None: leave torch's setting alone)."""
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
            if not twin.model.config.causal:
                twin, note = None, f"No autoregressive twin: {arm} is a masked-diffusion model (causal=false)."
        except ModelLoadError as e:
            note = f"No autoregressive twin: {e}"
        if note:
            progress(note)
    else:
        note = "No autoregressive twin loaded (start the app with --arm DIR to compare)."
    studio = Studio(mdm, twin, arm_note=note, model_path=model, **kwargs)
    if backend != "torch":
        from .backends import build_denoiser

        progress(f"preparing the {backend} back end …")
        last = [-1]

        def report(fraction: float, what: str):
            if int(fraction * 10) != last[0]:  # a line per 10%, not per tick
                last[0] = int(fraction * 10)
                progress(f"  {100 * fraction:3.0f}% {what}")

        try:
            studio.set_onnx(build_denoiser(mdm, backend, onnx_dir=onnx_dir, cache_root=studio.onnx_cache,
                                           progress=report))
        except (ValueError, RuntimeError) as e:  # unknown back end, OnnxBackendError, ExportError
            raise ModelLoadError(f"cannot use the {backend} back end: {e}") from None
        studio.use_backend(backend)
    return studio
