"""The Gradio page: layout and wiring only. Handlers are thin adapters over a `Studio`.

Named API endpoints (for `gradio_client`): `/chat`, `/poem`, `/evaluate`, `/export`, `/backend`.
Each browser session (and each `gradio_client.Client`) has its own conversation in a `gr.State`.
"""
from __future__ import annotations

import contextlib
import logging
import traceback
from dataclasses import dataclass

import gradio as gr

from . import poems
from .studio import (CHINESE_COUPLETS, DECODING_MODES, DIRECTIONS, REMASKING, ChatSettings, RequestError,
                     Stopped, Studio)

log = logging.getLogger(__name__)

CSS = """
.ld-canvas { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; line-height: 1.75;
             word-break: break-word; font-size: 0.95em; }
.ld-mask { color: #9aa3ad; letter-spacing: 0.5px; }
.ld-new { border-radius: 4px; padding: 0 1px; font-weight: 600; }
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


def chat_examples(studio: Studio) -> list[str]:
    """Questions in the phrasings the bundled model was fine-tuned on, about its own sonnets."""
    first = studio.corpus.split("train")[0]
    return [poems.question(first.lines[0], "next"), poems.question(first.lines[3], "previous"),
            poems.first_line_question(first.number + 1), poems.followup_question("next")]


def poem_examples(studio: Studio) -> tuple[list[list[str]], list[str]]:
    """Sonnet lines from the SFT sonnets and from the held-out ones, then famous Chinese couplets."""
    rows, labels = [], []
    train, held = studio.corpus.split("train"), studio.corpus.split("heldout")
    for sonnet, kind in ((train[0], "sonnet"), (held[0], "held-out sonnet") if held else (train[-1], "sonnet")):
        rows += [[sonnet.lines[2], "next"], [sonnet.lines[5], "previous"]]
        labels += [f"{kind} {sonnet.number} · next", f"{kind} {sonnet.number} · previous"]
    for (first, second), who in zip(CHINESE_COUPLETS[::2], ("李白 静夜思", "王之涣 登鹳雀楼", "王勃")):
        rows += [[first, "next"], [second, "previous"]]
        labels += [f"{who} · next (LLaDA-8B)", f"{who} · previous (LLaDA-8B)"]
    return rows, labels


# Default pause between two animated steps: a CPU-sized model finishes a step in a few ms, too fast to
# follow; big models are slower than this anyway. The stats line counts compute time only.
PACE_MS = 40

LEGEND = ('<div class="ld-legend ld-stats"><span class="ld-mask">░</span> masked · '
          '<span style="background:hsla(10,85%,45%,.3)">new, low confidence</span> '
          '<span style="background:hsla(120,85%,45%,.3)">new, high confidence</span> · '
          'plain: revealed earlier · <span class="ld-eos">·</span> end of text</div>')


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
    """Every failure reaches the page as a readable message; only unexpected ones leave a traceback."""
    if isinstance(e, (RequestError, ValueError)):
        return gr.Error(str(e))
    log.error("request failed:\n%s", traceback.format_exc())
    return gr.Error(f"Internal error ({type(e).__name__}): {e}. The server is still running.")


@contextlib.contextmanager
def _errors_to_page():
    """A failure inside the block reaches the page as `_user_error`'s message; the server carries on."""
    try:
        yield
    except Exception as e:  # noqa: BLE001
        raise _user_error(e) from None


def model_summary(studio: Studio) -> str:
    d = studio.describe()
    return (f"**{d['name']}** · {d['parameters'] / 1e6:.1f} M parameters · {d['device']} · {d['dtype']} · "
            f"back end **{d['backend']}**")


def model_markdown(studio: Studio) -> str:
    d = studio.describe()
    rows = [("name", d["name"]), ("parameters", f"{d['parameters'] / 1e6:.2f} M"), ("device", d["device"]),
            ("dtype", d["dtype"]), ("back end", d["backend"]),
            ("layers × width", f"{d['layers']} × {d['d_model']}"),
            ("context", f"{d['context']} tokens"), ("autoregressive twin", d["arm"] or "none")]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def build_app(studio: Studio, *, concurrency_limit: int | None = None) -> gr.Blocks:
    """The page for one studio. The queue allows `concurrency_limit` model requests at a time
    (default: 1 on a CPU, 2 on a GPU), shared by chat, poem, evaluation and export."""
    if concurrency_limit is None:
        concurrency_limit = 1 if studio.mdm.device.type == "cpu" else 2
    model_limit = dict(concurrency_limit=concurrency_limit, concurrency_id="model")

    with gr.Blocks(title="LLaDA Studio", analytics_enabled=False) as demo:
        gr.Markdown("## LLaDA Studio · masked-diffusion language models, step by step")
        with gr.Accordion("Model", open=False):
            model_md = gr.Markdown(model_markdown(studio), label="model")
        model_line = gr.Markdown(model_summary(studio), elem_classes="ld-stats", elem_id="model-line")

        with gr.Tabs():
            # ---------------------------------------------------------------- chat
            with gr.Tab("Chat"):
                conversation = gr.State([])  # this session's turns, plain text: [{"role","content"}]
                with gr.Row():
                    with gr.Column(scale=3):
                        chatbot = gr.Chatbot(label="Conversation", height=440, sanitize_html=True,
                                             feedback_options=None, elem_id="chatbot",
                                             placeholder="Ask something and watch the masks (░) turn into "
                                                         "words, the most confident first.")
                        stats = gr.Markdown(elem_classes="ld-stats", elem_id="chat-stats", label="stats")
                        with gr.Row(equal_height=True):
                            message_box = gr.Textbox(placeholder="Ask something… (Enter sends)", show_label=False,
                                                     scale=6, elem_id="message", max_lines=6, container=False)
                            send = gr.Button("Send", variant="primary", scale=1, min_width=70, elem_id="send")
                            stop = gr.Button("Stop", variant="stop", scale=1, min_width=70, elem_id="stop")
                            clear = gr.Button("Clear", scale=1, min_width=70, elem_id="clear")
                        gr.Examples(chat_examples(studio), inputs=message_box)
                    with gr.Column(scale=2):
                        defaults = studio.default_settings()
                        gen_length = gr.Slider(8, 512, value=defaults.gen_length, step=8, label="Gen length",
                                               elem_id="gen-length")
                        steps = gr.Slider(1, 512, value=defaults.steps, step=1, label="Steps", elem_id="steps")
                        block_length = gr.Slider(4, 512, value=defaults.block_length, step=4,
                                                 label="Block length")
                        mode = gr.Dropdown(list(DECODING_MODES), value=defaults.mode, label="Decoding")
                        threshold = gr.Slider(0.5, 1.0, value=defaults.threshold, step=0.01,
                                              label="τ (threshold modes)")
                        animate = gr.Checkbox(value=defaults.animate, label="Animate the denoising")
                        with gr.Accordion("More settings", open=False):
                            with gr.Row():
                                temperature = gr.Slider(0, 2, value=defaults.temperature, step=0.05,
                                                        label="Temperature")
                                cfg_scale = gr.Slider(0, 3, value=defaults.cfg_scale, step=0.1, label="CFG scale")
                            remasking = gr.Radio(list(REMASKING), value=defaults.remasking, label="Remasking")
                            pace_ms = gr.Slider(0, 200, value=PACE_MS, step=5, label="Animation pace (ms per step)",
                                                info="0: as fast as the model goes (tokens/s counts compute only)")
                            constraints = gr.Textbox("", label="Word constraints", placeholder="0:Shall, 5:summer",
                                                     info="position:word pairs forced into the answer")
                            lengths = gr.Textbox(defaults.lengths, label="Length search (answer lengths)",
                                                 placeholder="8:24", elem_id="chat-lengths",
                                                 info="MIN:MAX tokens: decode each length, keep the most "
                                                      "confident; empty: the gen length decides")
                        gr.HTML(LEGEND)
                controls = [gen_length, steps, block_length, temperature, cfg_scale, remasking, mode,
                            threshold, animate, pace_ms, constraints, lengths]

                signal = gr.State(StopSignal())  # deep-copied: one per session

                def chat(message, history, signal, gen_length, steps, block_length, temperature, cfg_scale,
                         remasking, mode, threshold, animate, pace_ms, constraints, lengths):
                    history = list(history or [])
                    settings = ChatSettings(gen_length, steps, block_length, temperature, cfg_scale, remasking,
                                            mode, threshold, animate, pace_ms=pace_ms, constraints=constraints,
                                            lengths=lengths)
                    shown = [*history, {"role": "user", "content": (message or "").strip()}]
                    stream = studio.stream_chat(history, message, settings,
                                                should_stop=signal.should_stop)
                    try:
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
                        stream.close()

                def arm_signal(signal):
                    signal.requested = None

                def request(what):
                    def handler(signal):
                        signal.requested = what
                    return handler

                # Send first re-arms the session's stop signal (instantly, outside the queue), then queues
                # the answer; Stop pressed while the answer waits in the queue still stops it.
                gr.on([send.click, message_box.submit], arm_signal, signal, None, queue=False,
                      api_visibility="private").then(
                    chat, [message_box, conversation, signal, *controls], [chatbot, stats, message_box, conversation],
                    api_name="chat", show_progress="hidden", **model_limit)
                stop.click(request("stop"), signal, None, queue=False, api_visibility="private")
                # Clear empties the page at once; a running answer also ends itself with an empty page.
                clear.click(request("clear"), signal, None, queue=False, api_visibility="private").then(
                    lambda: ([], [], "", ""), None, [chatbot, conversation, message_box, stats], queue=False,
                    api_visibility="private")

            # ---------------------------------------------------------------- reversal poem
            with gr.Tab("Reversal poem"):
                gr.Markdown("Ask for the **next** or the **previous** line. An autoregressive model that only ever "
                            "read the poem forwards cannot recall it backwards (the reversal curse); a masked "
                            "diffusion model can. The Chinese couplets are for LLaDA-8B-Instruct "
                            "(`--model GSAI-ML/LLaDA-8B-Instruct`).")
                with gr.Row():
                    line_box = gr.Textbox(label="A line of a poem", scale=4, elem_id="poem-line")
                    direction = gr.Radio(list(DIRECTIONS), value="next", label="Direction", scale=1)
                    run_poem = gr.Button("Ask both models", variant="primary", scale=1, elem_id="poem-ask")
                    stop_poem = gr.Button("Stop", variant="stop", scale=0, min_width=70, elem_id="poem-stop")
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("**Masked diffusion (LLaDA)**")
                        mdm_view = gr.HTML(label="mdm", elem_id="poem-mdm", min_height=90)
                    with gr.Column():
                        gr.Markdown("**Autoregressive twin**")
                        arm_view = gr.HTML(label="arm", elem_id="poem-arm", min_height=90,
                                           value="" if studio.arm else f"<i>{studio.arm_note}</i>")
                expected_md = gr.Markdown(label="verdict", elem_id="poem-verdict")
                with gr.Accordion("Poem settings and raw result", open=False):
                    with gr.Row():
                        poem_gen = studio.answer_slots or poems.GEN_LENGTH
                        poem_length = gr.Slider(8, 128, value=poem_gen, step=4, label="Gen length (= block length)")
                        poem_steps = gr.Slider(1, 128, value=poem_gen, step=1, label="Steps")
                        poem_animate = gr.Checkbox(value=True, label="Animate")
                        poem_pace = gr.Slider(0, 200, value=PACE_MS / 2, step=5,
                                              label="Pace (ms per step, each model)", elem_id="poem-pace")
                        poem_lengths = gr.Textbox(studio.answer_lengths, label="MDM length search (MIN:MAX tokens)",
                                                  info="empty: one fixed gen length", elem_id="poem-lengths")
                    poem_result = gr.JSON(label="Result")
                rows, labels = poem_examples(studio)
                gr.Examples(rows, inputs=[line_box, direction], example_labels=labels)

                poem_signal = gr.State(StopSignal())  # deep-copied: one per session

                def poem(line, direction, signal, gen_length, steps, animate, pace_ms, lengths):
                    settings = ChatSettings(gen_length=gen_length, steps=steps, block_length=gen_length,
                                            animate=animate, pace_ms=pace_ms, lengths=lengths)
                    with _errors_to_page():
                        try:
                            for pf in studio.stream_poem(line, direction, settings,
                                                         should_stop=signal.should_stop):
                                mdm = pf.mdm.html + f'<div class="ld-stats">{pf.mdm.stats}</div>'
                                arm = (pf.arm.html + f'<div class="ld-stats">{pf.arm.stats}</div>' if pf.arm
                                       else f"<i>{studio.arm_note}</i>")
                                done = pf.mdm.done and (pf.arm is None or pf.arm.done)
                                result = studio.poem_result(pf) if done else None
                                yield mdm, arm, _expected_markdown(result), result
                        except Stopped:  # the last word on the verdict; the canvases keep the step they reached
                            yield gr.skip(), gr.skip(), "**Stopped**: the answers above are unfinished.", None

                # As in the chat: Ask re-arms the session's stop signal (outside the queue), then queues
                # the question; Stop ends it between two steps.
                gr.on([run_poem.click, line_box.submit], arm_signal, poem_signal, None, queue=False,
                      api_visibility="private").then(
                    poem, [line_box, direction, poem_signal, poem_length, poem_steps, poem_animate, poem_pace,
                           poem_lengths],
                    [mdm_view, arm_view, expected_md, poem_result], api_name="poem",
                    show_progress="hidden", **model_limit)
                stop_poem.click(request("stop"), poem_signal, None, queue=False, api_visibility="private")

                with gr.Accordion("Held-out evaluation (forward vs reversal, MDM vs ARM)", open=False):
                    run_eval = gr.Button("Run the held-out evaluation")
                    eval_table = gr.Dataframe(label="Exact match (%)", interactive=False)
                    eval_plot = gr.Plot(label="Forward vs reversal")

                def evaluate(progress=gr.Progress()):
                    with _errors_to_page():
                        rows = studio.evaluate(progress=lambda frac, desc: progress(frac, desc=desc))
                    return _table(rows), _bar_chart(rows)

                run_eval.click(evaluate, None, [eval_table, eval_plot], api_name="evaluate",
                               show_progress_on=[eval_table], **model_limit)

            # ---------------------------------------------------------------- export
            with gr.Tab("Export"):
                gr.Markdown("Export the loaded denoiser to ONNX (dynamic batch and sequence axes), check it "
                            "against PyTorch, then switch this running app to ONNX Runtime. Requests already "
                            "running finish on the back end they started with.")
                with gr.Row():
                    run_export = gr.Button("Export to ONNX and check parity", variant="primary")
                    backend = gr.Radio(["torch", "onnx"], value=studio.current_denoiser().name, label="Back end")
                    switch = gr.Button("Switch back end")
                switch_status = gr.Markdown(label="back end status")
                export_report = gr.Markdown(label="parity summary")
                with gr.Accordion("Full parity report", open=False):
                    parity = gr.JSON(label="Parity report")

                def export(progress=gr.Progress()):
                    with _errors_to_page():
                        report = studio.export_onnx(progress=lambda frac, desc: progress(frac, desc=desc))
                    return _export_markdown(report), report

                def use_backend(name):
                    with _errors_to_page():
                        studio.use_backend(name)
                    return (f"Back end is now **{name}** for new requests; running ones finish where they "
                            "started.", model_markdown(studio), model_summary(studio))

                run_export.click(export, None, [export_report, parity], api_name="export",
                                 show_progress_on=[export_report], **model_limit)
                switch.click(use_backend, backend, [switch_status, model_md, model_line], api_name="backend",
                             concurrency_limit=None)

    demo.queue(default_concurrency_limit=concurrency_limit, max_size=64)
    return demo


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           **kwargs):
    """Start the server with the page's style; `kwargs` go to `Blocks.launch` (e.g. prevent_thread_lock)."""
    return demo.launch(server_name=host, server_port=port, share=share, css=CSS, theme=theme(),
                       show_error=True, footer_links=["api"], **kwargs)


# ---- small presentation helpers ------------------------------------------------------------------
def _expected_markdown(result: dict | None) -> str:
    if not result:
        return ""
    if result["expected"] is None:
        return "*This line is not in the bundled corpus: no expected answer to compare with.*"

    def verdict(ok):
        if ok is None:
            return "—"
        return '<span class="ld-ok">✓ right</span>' if ok else '<span class="ld-bad">✗ wrong</span>'

    held = " (a held-out sonnet: no question about it was in the fine-tuning data)" if result.get("held_out") else ""
    return (f"**Expected:** {result['expected']}{held}  \n"
            f"MDM {verdict(result['mdm_correct'])} · ARM {verdict(result['arm_correct'])}")


def _table(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows)


def _bar_chart(rows: list[dict]):
    from matplotlib.figure import Figure  # no pyplot: no global figure registry to leak into

    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        xs = [j + i * width for j in range(2)]
        bars = ax.bar(xs, [row["forward"], row["reversal"]], width=width, label=row["model"])
        ax.bar_label(bars, fmt="%.0f")
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(2)],
                  ["forward (next line)", "reversal (previous line)"])
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    return fig


def _export_markdown(report: dict) -> str:
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
