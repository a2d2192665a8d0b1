"""The Gradio page: layout and wiring only; the handlers are module-level adapters over a `Studio`.

One function builds each tab (`chat_tab`, `poem_tab`, `export_tab`); the handlers they wire
(`chat_turn`, `poem_answer`, `run_evaluation`, `export_model`, `switch_backend`) take the studio as
their first argument and their settings by name, so they run without a server in the tests.
Named API endpoints (for `gradio_client`): `/chat`, `/poem`, `/evaluate`, `/export`, `/backend`.
Each browser session (and each `gradio_client.Client`) has its own conversation in a `gr.State`.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr

from . import poems
from .data import first_line_question, question
from .generation import REMASKING, format_lengths
from .studio import CHINESE_COUPLETS, DECODING_MODES, RIVAL_BACKEND, ChatSettings, RequestError, Stopped, Studio

log = logging.getLogger(__name__)

CSS = """
.ld-canvas { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; line-height: 1.75;
             word-break: break-word; font-size: 0.95em; }
.ld-mask { color: #9aa3ad; letter-spacing: 0.5px; }
.ld-new { border-radius: 4px; padding: 0 1px; font-weight: 600; }
.ld-given { color: #1d4ed8; font-style: italic; }
.ld-unseen { opacity: 0.55; text-decoration: line-through dotted; }
.ld-eos { color: #b8bec6; }
.ld-cursor { color: #3b82f6; animation: ld-blink 1s steps(1) infinite; }
@keyframes ld-blink { 50% { opacity: 0; } }
.ld-stats { font-size: 0.85em; opacity: 0.8; }
.ld-ok { color: #16a34a; font-weight: 700; }
.ld-bad { color: #dc2626; font-weight: 700; }
.ld-legend span { padding: 0 4px; border-radius: 4px; }
"""
# System fonts only: the page makes no request outside this machine (no Google Fonts).
_SANS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
_MONO = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]

# Default pause between two animated steps: a CPU-sized model finishes a step in a few ms, too fast to
# follow; big models are slower than this anyway. The stats line counts compute time only.
PACE_MS = 40

LEGEND = ('<div class="ld-legend ld-stats"><span class="ld-mask">░</span> masked · '
          '<span style="background:hsla(10,85%,45%,.3)">new, low confidence</span> '
          '<span style="background:hsla(120,85%,45%,.3)">new, high confidence</span> · '
          'plain: revealed earlier · <span class="ld-given">given</span> · '
          '<span class="ld-eos">·</span> end of text</div>')


@dataclass
class StopSignal:
    """Per session: what the Stop / Clear buttons asked of the running answer (None: nothing)."""

    requested: str | None = None  # "stop" or "clear"

    def should_stop(self) -> bool:
        """What the samplers ask between two steps."""
        return self.requested is not None


def theme():
    return gr.themes.Soft(font=_SANS, font_mono=_MONO)


def _user_error(e: Exception) -> gr.Error:
    """Every failure reaches the page as a readable message; only unexpected ones leave a traceback in
    the server's log (an expected one, a refused request, is one log line)."""
    if isinstance(e, (RequestError, ValueError)):
        log.info("request refused: %s", e)
        return gr.Error(str(e), print_exception=False)
    log.error("request failed:\n%s", traceback.format_exc())
    return gr.Error(f"Internal error ({type(e).__name__}): {e}. The server is still running.", print_exception=False)


@contextlib.contextmanager
def _errors_to_page():
    """A failure inside the block reaches the page as `_user_error`'s message; the server carries on."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        raise _user_error(e) from None


def _settings(names: list[str], values) -> ChatSettings:
    """Widget values -> ChatSettings, by the names the widgets were registered under."""
    return ChatSettings(**dict(zip(names, values, strict=True)))


def _bind(handler, studio: Studio, inputs: list[str], names: list[str]):
    """`handler(studio, names, *inputs, *settings)` as the function a Gradio event calls: its parameters
    are named `inputs + names`, which Gradio turns into the endpoint's keyword arguments."""
    if inspect.isgeneratorfunction(handler):
        def fn(*args):
            yield from handler(studio, names, *args)
    else:
        def fn(*args):
            return handler(studio, names, *args)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    fn.__signature__ = inspect.Signature([inspect.Parameter(n, kind) for n in inputs + names])
    fn.__name__ = handler.__name__
    return fn


# ---- what the loaded models measured (every claim on the page comes from here) -------------------
def _find(results: list[poems.EvalResult], kind: str, protocol: str, split: str = "heldout"):
    return next((r for r in results if r.kind == kind and r.protocol == protocol and r.split == split), None)


def _pct(r: poems.EvalResult | None, direction: str) -> str:
    if r is None:
        return "not measured"
    return f"{100 * (r.forward if direction == 'next' else r.reversal):.1f}%"


def poem_intro(studio: Studio, results: list[poems.EvalResult]) -> str:
    """The poem tab's text: what is held out, the protocols, and the loaded pair's own figures."""
    held = sorted(studio.corpus.heldout_numbers)
    lines = ["Give a line; the models answer with the **next** line or the **previous** one."]
    if studio.mdm.card.trained_here:
        lines.append(f"Both models read sonnets {min(held)}–{max(held)} only in pre-training, in reading order: "
                     "no fine-tuning question was ever asked about them (they are **held out**).")
    lines.append("**Completion** fills the gap next to the given line in running text, as pre-training showed "
                 "it; **chat** asks the question through the chat template. The autoregressive twin reads the "
                 "same canvas left to right, so for *previous* it writes the gap before it reaches the given line.")
    rows = []
    for protocol in poems.PROTOCOLS:
        for kind, label in (("MDM", "masked diffusion"), ("ARM", "autoregressive twin")):
            r = _find(results, kind, protocol)
            if r is not None:
                rows.append(f"| {label} | {protocol} | {_pct(r, 'next')} | {_pct(r, 'previous')} |")
    if rows:
        lines.append(f"Measured on the held-out sonnets (exact match, {results[0].n_pairs} line pairs per "
                     "direction):\n\n| model | protocol | next | previous |\n|---|---|---|---|\n" + "\n".join(rows))
    else:
        lines.append("No measured figures for these models yet: run the evaluation below.")
    return "\n\n".join(lines)


def chat_intro(studio: Studio, results: list[poems.EvalResult]) -> str:
    card = studio.mdm.card
    if not card.trained_here:
        return f"**{studio.mdm.name}**: ask anything."
    train = sorted(studio.corpus.train_numbers)
    held = sorted(studio.corpus.heldout_numbers)
    text = (f"**{studio.mdm.name}** is a {studio.describe()['parameters'] / 1e6:.2f}M-parameter model trained here "
            f"on Shakespeare's first {card.n_sonnets} sonnets and nothing else, then fine-tuned on questions about "
            f"sonnets {min(train)}–{max(train)}: the next or previous line of a line, the first line of a sonnet, "
            "which sonnet a line is from. Anything else (\"hello, who are you?\") gets sonnet-like words.")
    r_train, r_held = _find(results, "MDM", "chat", "train"), _find(results, "MDM", "chat", "heldout")
    if r_train or r_held:
        text += (f" Measured, exact match: next / previous line on sonnets {min(train)}–{max(train)} "
                 f"{_pct(r_train, 'next')} / {_pct(r_train, 'previous')}, on the held-out sonnets "
                 f"{min(held)}–{max(held)} {_pct(r_held, 'next')} / {_pct(r_held, 'previous')}.")
    return text


def chat_examples(studio: Studio, results: list[poems.EvalResult]) -> list[str]:
    """Questions the loaded model answered right in its stored evaluation (the SFT sonnets' lines);
    without one, questions in the phrasings a model trained here was fine-tuned on."""
    r = _find(results, "MDM", "chat", "train")
    if r is not None:
        right = r.examples("next")[:2] + r.examples("previous")[:1]
        return [question(i["given"], i["direction"]) for i in right]
    if studio.mdm.card.trained_here:
        first = studio.corpus.split("train")[0]
        return [question(first.lines[0], "next"), question(first.lines[3], "previous"),
                first_line_question(first.number)]
    return []


def poem_examples(studio: Studio, results: list[poems.EvalResult]) -> tuple[list[list[str]], list[str]]:
    """Lines the loaded pair's stored evaluation measured: held-out lines where the MDM is right, one of
    them a previous line the twin gets wrong; Chinese couplets only for a model with Chinese words."""
    rows, labels = [], []
    protocol = studio.default_protocol
    mdm, arm = _find(results, "MDM", protocol), _find(results, "ARM", protocol)
    if mdm is not None:
        arm_right = {(i["given"], i["direction"]) for i in (arm.items if arm else []) if i["correct"]}
        showcase = [i for i in mdm.examples("previous") if (i["given"], "previous") not in arm_right]
        both = [i for i in mdm.examples("next") if (i["given"], "next") in arm_right] or mdm.examples("next")
        for item, label in ((showcase[:1], "previous: MDM right, twin wrong"), (both[:1], "next: both right"),
                            (mdm.examples("previous")[1:2], "previous")):
            for i in item:
                info = studio.corpus.lookup(i["given"])
                rows.append([i["given"], i["direction"], protocol])
                labels.append(f"held-out sonnet {info.sonnet} · {label}" if info else label)
    if studio.mdm.card.chinese:
        for first, second in CHINESE_COUPLETS[::2]:
            rows += [[first, "next", protocol], [second, "previous", protocol]]
            labels += [f"{first} · next", f"{second} · previous"]
    return rows, labels


def model_summary(studio: Studio) -> str:
    d = studio.describe()
    return (f"**{d['name']}** · {d['parameters'] / 1e6:.1f} M parameters · {d['device']} · {d['dtype']} · "
            f"back end **{d['backend']}**")


def model_markdown(studio: Studio) -> str:
    d = studio.describe()
    rows = [("name", d["name"]), ("parameters", f"{d['parameters'] / 1e6:.2f} M"), ("device", d["device"]),
            ("dtype", d["dtype"]), ("back end", d["backend"]),
            ("layers × width", f"{d['layers']} × {d['d_model']}"),
            ("context", f"{d['context']} tokens"), ("autoregressive twin", d["arm"] or "none"),
            ("pre-trained base (completion protocol)", d["base"] or "none: the model itself")]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


# ---- handlers (module level: the tests call them without a server) -------------------------------
def chat_turn(studio: Studio, names: list[str], message, history, signal: StopSignal, *values) -> Iterator[tuple]:
    """-> (chatbot messages, stats line, message box, conversation state), once per shown step."""
    history = list(history or [])
    shown = [*history, {"role": "user", "content": (message or "").strip()}]
    stream = None
    try:
        stream = studio.stream_chat(history, message, _settings(names, values), should_stop=signal.should_stop)
        for frame in stream:
            if frame.done:
                turn = [*shown, {"role": "assistant", "content": frame.text}]
                view = turn if frame.text else [
                    *shown, {"role": "assistant", "content": "*(end of text at once: empty answer)*"}]
                yield view, frame.stats, "", turn
            else:
                yield [*shown, {"role": "assistant", "content": frame.html}], frame.stats, "", history
    except Stopped as e:  # the last word on these outputs, so no late frame can overwrite it
        if signal.requested == "clear":
            yield [], "", "", []
        else:
            yield history, f"Stopped ({e}); the unfinished answer was discarded.", message, history
    except Exception as e:  # noqa: BLE001  (shown to the user, the server carries on)
        raise _user_error(e) from None
    finally:
        if stream is not None:
            stream.close()


def poem_answer(studio: Studio, names: list[str], line, direction, protocol, signal: StopSignal,
                *values) -> Iterator[tuple]:
    """-> (MDM canvas, ARM canvas, verdict, result), once per shown step."""
    settings = _settings(names, values)
    settings.block_length = settings.gen_length  # the poem tab decodes one block
    with _errors_to_page():
        try:
            for pf in studio.stream_poem(line, direction, protocol, settings, should_stop=signal.should_stop):
                mdm = pf.mdm.html + f'<div class="ld-stats">{pf.mdm.stats}</div>'
                arm = (pf.arm.html + f'<div class="ld-stats">{pf.arm.stats}</div>' if pf.arm
                       else f"<i>{studio.arm_note}</i>")
                done = pf.mdm.done and (pf.arm is None or pf.arm.done)
                result = studio.poem_result(pf) if done else None
                yield mdm, arm, verdict_markdown(result), result
        except Stopped:  # the last word on the verdict; the canvases keep the step they reached
            yield gr.skip(), gr.skip(), "**Stopped**: the answers above are unfinished.", None


def check_chat(studio: Studio, names: list[str], message, history, signal: StopSignal, *values) -> None:
    """Runs before a chat request is queued: a refused one shows its reason, the conversation untouched."""
    with _errors_to_page():
        studio.stream_chat(history or [], message, _settings(names, values)).close()


def race(studio: Studio, names: list[str], message, history, rival, signal: StopSignal, *values) -> Iterator[tuple]:
    """-> (canvas A, canvas B, verdict): the message answered by the chat settings and by the rival."""
    with _errors_to_page():
        try:
            for a, b in studio.stream_race(history or [], message, _settings(names, values), rival,
                                           should_stop=signal.should_stop):
                done = a.done and b.done
                verdict = ""
                if done:
                    same = a.text == b.text
                    verdict = ("**Same answer** from both." if same else "**Different answers.**") + \
                              f" A: {_figures(a)} · B: {_figures(b)}"
                yield (a.html + f'<div class="ld-stats">{a.stats}</div>',
                       b.html + f'<div class="ld-stats">{b.stats}</div>', verdict)
        except Stopped:
            yield gr.skip(), gr.skip(), "**Stopped**: both answers are unfinished."


def _figures(frame) -> str:
    """The NFE, seconds and tokens/s of a finished frame's stats line ("NFE 12 · 0.31 s · 80.1 tokens/s")."""
    return " · ".join(p for p in frame.stats.split(" · ") if p.startswith("NFE") or p.endswith((" s", "tokens/s")))


def check_poem(studio: Studio, names: list[str], line, direction, protocol, signal: StopSignal, *values) -> None:
    with _errors_to_page():
        settings = _settings(names, values)
        settings.block_length = settings.gen_length
        studio.stream_poem(line, direction, protocol, settings).close()


def run_evaluation(studio: Studio, signal: StopSignal, progress=gr.Progress()):
    """-> (table, chart, note): the held-out evaluation measured now (Stop ends it between batches)."""
    try:
        with _errors_to_page():
            results = studio.evaluate(progress=lambda frac, what: progress(frac, desc=what),
                                      should_stop=signal.should_stop)
    except Stopped as e:
        return gr.skip(), gr.skip(), f"Stopped ({e}): the table shows the figures it had before."
    return evaluation_table(results, "measured now"), evaluation_chart(results), "Measured now, on this machine."


def export_model(studio: Studio, progress=gr.Progress()):
    with _errors_to_page():
        report = studio.export_onnx(progress=lambda frac, desc: progress(frac, desc=desc))
    return export_markdown(report), report


def switch_backend(studio: Studio, name) -> str:
    with _errors_to_page():
        studio.use_backend(name)
    return f"Back end is now **{name}** for new requests; running ones finish where they started."


def _arm_signal(signal: StopSignal) -> str:
    signal.requested = None
    return ""  # the stats line of the previous answer goes


def _request(what: str):
    def handler(signal: StopSignal):
        signal.requested = what
    return handler


# ---- tabs ----------------------------------------------------------------------------------------
def chat_tab(studio: Studio, results: list[poems.EvalResult], model_limit: dict) -> None:
    defaults = studio.default_settings()
    gr.Markdown(chat_intro(studio, results), elem_id="chat-intro")
    conversation = gr.State([])  # this session's turns, plain text: [{"role","content"}]
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="Conversation", height=440, sanitize_html=True, feedback_options=None,
                                 elem_id="chatbot", placeholder="Ask something and watch the masks (░) turn into "
                                                                "words, the most confident first.")
            stats = gr.Markdown(elem_classes="ld-stats", elem_id="chat-stats", label="stats")
            with gr.Row(equal_height=True):
                message_box = gr.Textbox(placeholder="Ask something… (Enter sends)", show_label=False, scale=6,
                                         elem_id="message", max_lines=6, container=False)
                send = gr.Button("Send", variant="primary", scale=1, min_width=70, elem_id="send")
                stop = gr.Button("Stop", variant="stop", scale=1, min_width=70, elem_id="stop")
                clear = gr.Button("Clear", scale=1, min_width=70, elem_id="clear")
            examples = chat_examples(studio, results)
            if examples:
                gr.Examples(examples, inputs=message_box)
        with gr.Column(scale=2):
            controls = dict(
                gen_length=gr.Slider(8, 512, value=defaults.gen_length, step=8, label="Gen length",
                                     elem_id="gen-length"),
                steps=gr.Slider(1, 512, value=defaults.steps, step=1, label="Steps", elem_id="steps"),
                block_length=gr.Slider(4, 512, value=defaults.block_length, step=4, label="Block length"),
                mode=gr.Dropdown(list(DECODING_MODES), value=defaults.mode, label="Decoding"),
                threshold=gr.Slider(0.5, 1.0, value=defaults.threshold, step=0.01, label="τ (threshold modes)"),
                animate=gr.Checkbox(value=defaults.animate, label="Animate the denoising"))
            with gr.Accordion("More settings", open=False):
                with gr.Row():
                    controls["temperature"] = gr.Slider(0, 2, value=defaults.temperature, step=0.05,
                                                        label="Temperature")
                    controls["cfg_scale"] = gr.Slider(0, 3, value=defaults.cfg_scale, step=0.1, label="CFG scale")
                controls["remasking"] = gr.Radio(list(REMASKING), value=defaults.remasking,
                                                 label="Remasking")
                controls["pace_ms"] = gr.Slider(0, 200, value=PACE_MS, step=5, label="Animation pace (ms per step)",
                                                info="0: as fast as the model goes (tokens/s counts compute only)")
                controls["constraints"] = gr.Textbox("", label="Word constraints", placeholder="0:Shall, 5:summer",
                                                     info="position:word pairs forced into the answer")
                controls["lengths"] = gr.Textbox(defaults.lengths, label="Length search (answer lengths)",
                                                 placeholder="8:24", elem_id="chat-lengths",
                                                 info="MIN:MAX tokens: decode each length, keep the best "
                                                      "(confidence + likelihood); empty: the gen length decides")
            gr.HTML(LEGEND)
    with gr.Accordion("Race: the same question, two decoders side by side", open=False):
        with gr.Row():
            rival = gr.Dropdown([*DECODING_MODES, RIVAL_BACKEND], value="threshold + dual cache", scale=3,
                                label="B: decoding mode (A: the settings on the right)", elem_id="race-rival")
            run_race = gr.Button("Race A vs B", scale=1, elem_id="race-run")
        with gr.Row():
            race_a = gr.HTML(label="A", elem_id="race-a", min_height=60)
            race_b = gr.HTML(label="B", elem_id="race-b", min_height=60)
        race_verdict = gr.Markdown(elem_id="race-verdict")
    signal = gr.State(StopSignal())  # deep-copied: one per session
    race_inputs = [message_box, conversation, rival, signal, *controls.values()]
    run_race.click(_arm_signal, signal, race_verdict, queue=False, api_visibility="private").then(
        _bind(race, studio, ["message", "history", "rival", "signal"], list(controls)), race_inputs,
        [race_a, race_b, race_verdict], api_name="race", show_progress="hidden", **model_limit)
    inputs, names = [message_box, conversation, signal, *controls.values()], ["message", "history", "signal"]
    # Send first re-arms the session's stop signal and clears the stats line (instantly, outside the queue),
    # checks the request (a refused one says why in a pop-up, the conversation untouched), then queues the
    # answer; Stop pressed while the answer waits in the queue still stops it.
    gr.on([send.click, message_box.submit], _arm_signal, signal, stats, queue=False, api_visibility="private").then(
        _bind(check_chat, studio, names, list(controls)), inputs, None, queue=False,
        api_visibility="private").success(
        _bind(chat_turn, studio, names, list(controls)), inputs,
        [chatbot, stats, message_box, conversation], api_name="chat", show_progress="hidden", **model_limit)
    stop.click(_request("stop"), signal, None, queue=False, api_visibility="private")
    # Clear empties the page at once; a running answer also ends itself with an empty page.
    clear.click(_request("clear"), signal, None, queue=False, api_visibility="private").then(
        lambda: ([], [], "", ""), None, [chatbot, conversation, message_box, stats], queue=False,
        api_visibility="private")


def poem_tab(studio: Studio, results: list[poems.EvalResult], note: str, model_limit: dict) -> None:
    gr.Markdown(poem_intro(studio, results), elem_id="poem-intro")
    with gr.Row():
        line_box = gr.Textbox(label="A line of a poem", scale=4, elem_id="poem-line")
        direction = gr.Radio(list(poems.DIRECTIONS), value="next", label="Direction", scale=1)
        protocol = gr.Radio(list(poems.PROTOCOLS), value=studio.default_protocol, label="Protocol", scale=1,
                            elem_id="poem-protocol")
        ask = gr.Button("Ask both models", variant="primary", scale=1, elem_id="poem-ask")
        stop = gr.Button("Stop", variant="stop", scale=0, min_width=70, elem_id="poem-stop")
    with gr.Row():
        with gr.Column():
            gr.Markdown("**Masked diffusion (LLaDA)**")
            mdm_view = gr.HTML(label="mdm", elem_id="poem-mdm", min_height=90)
        with gr.Column():
            gr.Markdown("**Autoregressive twin** (reads left to right)")
            arm_view = gr.HTML(label="arm", elem_id="poem-arm", min_height=90,
                               value="" if studio.arm else f"<i>{studio.arm_note}</i>")
    verdict = gr.Markdown(label="verdict", elem_id="poem-verdict")
    gr.HTML(LEGEND)
    with gr.Accordion("Poem settings and raw result", open=False):
        with gr.Row():
            gen = studio.decoding.gen_length
            controls = dict(
                gen_length=gr.Slider(8, 128, value=gen, step=4, label="Chat: gen length (= block length)"),
                steps=gr.Slider(1, 128, value=gen, step=1, label="Chat: steps"),
                animate=gr.Checkbox(value=True, label="Animate"),
                pace_ms=gr.Slider(0, 200, value=PACE_MS / 2, step=5, label="Pace (ms per step, each model)",
                                  elem_id="poem-pace"),
                lengths=gr.Textbox(studio.answer_lengths or format_lengths(studio.decoding.gap_lengths()),
                                   label="MDM answer lengths searched (MIN:MAX tokens)", elem_id="poem-lengths",
                                   info="completion: the gap lengths tried; chat: empty = one fixed gen length"))
        raw = gr.JSON(label="Result")
    rows, labels = poem_examples(studio, results)
    if rows:
        gr.Examples(rows, inputs=[line_box, direction, protocol], example_labels=labels)
    signal = gr.State(StopSignal())  # deep-copied: one per session
    inputs, names = [line_box, direction, protocol, signal, *controls.values()], ["line", "direction", "protocol",
                                                                                  "signal"]
    # As in the chat: Ask re-arms the session's stop signal and checks the request outside the queue.
    gr.on([ask.click, line_box.submit], _arm_signal, signal, verdict, queue=False, api_visibility="private").then(
        _bind(check_poem, studio, names, list(controls)), inputs, None, queue=False, api_visibility="private").success(
        _bind(poem_answer, studio, names, list(controls)), inputs, [mdm_view, arm_view, verdict, raw],
        api_name="poem", show_progress="hidden", **model_limit)
    stop.click(_request("stop"), signal, None, queue=False, api_visibility="private")

    held = [r for r in results if r.split == "heldout"]
    with gr.Accordion("Held-out evaluation: both protocols × both directions × both models", open=True):
        eval_note = gr.Markdown(("Stored with the models (computed by their training run or `poems eval --store`, "
                                 "for these weights and settings). " if held else "") + note, elem_id="eval-note")
        with gr.Row():
            run = gr.Button("Run the evaluation again" if held else "Run the held-out evaluation", elem_id="eval-run")
            stop_eval = gr.Button("Stop", variant="stop", scale=0, min_width=70, elem_id="eval-stop")
        table = gr.Dataframe(evaluation_table(held, "stored"), label="Exact match (%)", interactive=False,
                             elem_id="eval-table")
        chart = gr.Plot(evaluation_chart(held) if held else None, label="Next vs previous line", elem_id="eval-chart")
    eval_signal = gr.State(StopSignal())
    # Its own slot: chat and poem answers keep being served while it runs (one evaluation at a time).
    run.click(_arm_signal, eval_signal, eval_note, queue=False, api_visibility="private").then(
        functools.partial(run_evaluation, studio), eval_signal, [table, chart, eval_note], api_name="evaluate",
        show_progress_on=[table], concurrency_limit=1, concurrency_id="evaluation")
    stop_eval.click(_request("stop"), eval_signal, None, queue=False, api_visibility="private")


def export_tab(studio: Studio, model_md, model_line, model_limit: dict) -> None:
    gr.Markdown("Export the loaded denoiser to ONNX (dynamic batch and sequence axes), check it against "
                "PyTorch, then switch this running app to ONNX Runtime. Requests already running finish on "
                "the back end they started with.")
    with gr.Row():
        export = gr.Button("Export to ONNX and check parity", variant="primary")
        backend = gr.Radio(["torch", "onnx"], value=studio.current_denoiser().name, label="Back end")
        switch = gr.Button("Switch back end")
    switch_status = gr.Markdown(label="back end status", elem_id="backend-status")
    report_md = gr.Markdown("*Not exported yet.*", label="parity summary", elem_id="export-report", min_height=60)
    with gr.Accordion("Full parity report", open=False):
        parity = gr.JSON(label="Parity report")
    export.click(functools.partial(export_model, studio), None, [report_md, parity], api_name="export",
                 show_progress_on=[report_md], **model_limit)
    # A refused switch marks only its own status line; the model lines change once the switch is done.
    switch.click(functools.partial(switch_backend, studio), backend, switch_status, api_name="backend",
                 concurrency_limit=None).success(
        lambda: (model_markdown(studio), model_summary(studio)), None, [model_md, model_line], queue=False,
        api_visibility="private")


def build_app(studio: Studio, *, concurrency_limit: int | None = None) -> gr.Blocks:
    """The page for one studio. The queue allows `concurrency_limit` model requests at a time
    (default: 1 on a CPU, 2 on a GPU), shared by chat, poem, evaluation and export."""
    if concurrency_limit is None:
        concurrency_limit = 1 if studio.mdm.device.type == "cpu" else 2
    model_limit = dict(concurrency_limit=concurrency_limit, concurrency_id="model")
    results, note = studio.stored_evaluation()
    with gr.Blocks(title="LLaDA Studio", analytics_enabled=False) as demo:
        gr.Markdown("## LLaDA Studio · masked-diffusion language models, step by step")
        with gr.Accordion("Model", open=False):
            model_md = gr.Markdown(model_markdown(studio), label="model")
        model_line = gr.Markdown(model_summary(studio), elem_classes="ld-stats", elem_id="model-line")
        with gr.Tabs():
            with gr.Tab("Chat"):
                chat_tab(studio, results, model_limit)
            with gr.Tab("Reversal poem"):
                poem_tab(studio, results, note, model_limit)
            with gr.Tab("Export"):
                export_tab(studio, model_md, model_line, model_limit)
    demo.queue(default_concurrency_limit=concurrency_limit, max_size=64)
    return demo


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           **kwargs):
    """Start the server with the page's style; `kwargs` go to `Blocks.launch` (e.g. prevent_thread_lock)."""
    # max_file_size=0: the page takes no files, so the upload route stores none (it would serve anything
    # anyone sent, of any size, to whoever can reach the server).
    return demo.launch(server_name=host, server_port=port, share=share, css=CSS, theme=theme(),
                       show_error=True, footer_links=["api"], max_file_size=0, **kwargs)


# ---- presentation helpers ------------------------------------------------------------------------
def verdict_markdown(result: dict | None) -> str:
    if not result:
        return ""
    if result["expected"] is None:
        return "*This line is not in the bundled corpus: no expected answer to compare with.*"

    def verdict(ok):
        if ok is None:
            return "—"
        return '<span class="ld-ok">✓ right</span>' if ok else '<span class="ld-bad">✗ wrong</span>'

    held = " (a held-out sonnet: only ever read in pre-training)" if result.get("held_out") else ""
    return (f"**Expected:** {result['expected']}{held}  \n"
            f"MDM {verdict(result['mdm_correct'])} · ARM {verdict(result['arm_correct'])}")


EVAL_COLUMNS = ["model", "protocol", "next line", "previous line", "pairs", "source"]


def evaluation_table(results: list[poems.EvalResult], source: str):
    """Measured rows (held-out), then the LLaDA paper's figures, labelled as quoted."""
    import pandas as pd

    rows = [[f"{r.model} [{r.kind}]", r.protocol, round(100 * r.forward, 1), round(100 * r.reversal, 1), r.n_pairs,
             source] for r in results]
    rows += [[name, "chat (Chinese couplets)", fwd, rev, 496, "quoted: LLaDA paper, Table 4 (not measured here)"]
             for name, fwd, rev in poems.PAPER_FIGURES]
    return pd.DataFrame(rows, columns=EVAL_COLUMNS)


def evaluation_chart(results: list[poems.EvalResult]):
    """Grouped bars: protocol × direction on the x axis, one bar per model (blues for masked diffusion,
    oranges for autoregressive, a shade per model); the paper's figures as hatched grey bars in the chat
    groups. Labels sit above their bars; the legend sits below the axes."""
    from matplotlib.figure import Figure  # no pyplot: no global figure registry to leak into

    groups = [(p, d) for p in poems.PROTOCOLS for d in poems.DIRECTIONS]
    series = [(f"{r.model} [{r.kind}]", r.protocol, r) for r in results]
    models = list(dict.fromkeys((name, r.kind) for name, _, r in series))
    quoted = [poems.PAPER_FIGURES[0]]  # LLaDA-8B-Instruct, next to the measured chat bars
    n = len(models) + len(quoted)
    width = 0.8 / max(n, 1)
    fig = Figure(figsize=(7.5, 3.8))
    ax = fig.subplots()
    shades = {"MDM": ["#2563eb", "#93c5fd", "#1e3a8a"], "ARM": ["#f97316", "#fdba74", "#9a3412"]}  # per model of a kind
    for k, (name, kind) in enumerate(models):
        palette = shades.get(kind, ["#6b7280"])
        colour = palette[[kd for _, kd in models[:k]].count(kind) % len(palette)]  # the kind's n-th model
        xs, ys = [], []
        for g, (protocol, direction) in enumerate(groups):
            r = next((r for m, p, r in series if m == name and p == protocol), None)
            if r is not None:
                xs.append(g + k * width)
                ys.append(100 * (r.forward if direction == "next" else r.reversal))
        bars = ax.bar(xs, ys, width=width, label=name, color=colour)
        ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
    for q, (name, fwd, rev) in enumerate(quoted):
        k = len(models) + q
        xs = [g + k * width for g, (p, _) in enumerate(groups) if p == "chat"]
        bars = ax.bar(xs, [fwd, rev], width=width, color="#d1d5db", hatch="//", edgecolor="#6b7280",
                      label=f"{name}, quoted (paper, Chinese couplets)")
        ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
    ax.set_xticks([g + width * (n - 1) / 2 for g in range(len(groups))],
                  [f"{p}\n{'next' if d == 'next' else 'previous'} line" for p, d in groups])
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 112)  # room above a 100% bar for its label
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=min(n, 3), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def export_markdown(report: dict) -> str:
    verdict = {True: "passed", False: "FAILED", None: "not checked"}[report.get("passed")]
    lines = [f"Exported to `{report.get('folder', '?')}` · parity **{verdict}** · K/V-cache graph: "
             f"{'yes' if report.get('supports_cache') else 'no (vanilla and threshold modes only)'}. "
             "Pick **onnx** and press *Switch back end*.", ""]
    cases = report.get("cases") or []
    if cases:
        lines += ["| case | graph | max abs Δlogits | argmax agreement | ok |", "|---|---|---|---|---|"]
        lines += [f"| {c['case']} | {c.get('graph', '')} | {c['max_abs_diff']:.2e} | {c['argmax_agreement']:.4f} | "
                  f"{'✓' if c['passed'] else '✗'} |" for c in cases]
    return "\n".join(lines)

