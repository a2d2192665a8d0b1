"""The Gradio app, launched in-process on a free port and driven through its named API with gradio_client.

Runs on the bundled checkpoints when they exist (real follow-up questions, real poems), otherwise on
a tiny random MDM + causal twin (then only the plumbing is checked: prompts, streaming, errors).
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from ui_support import free_port, mask_count, message_text, strip_tags

from llada_app import poems
from llada_app.data import followup_question, question
from llada_app.studio import DECODING_MODES, MASK_GLYPH, ChatSettings, Stopped, build_studio, render_canvas
from llada_app.tokenization import chat_prompt_ids, decode_answer
from llada_app.ui import build_app, launch

# Small canvases keep the suite fast; one block, so every step is a visible reveal.
FAST = dict(gen_length=32, steps=32, block_length=32, pace_ms=0)


@pytest.fixture(scope="module")
def studio(app_models, tmp_path_factory):
    mdm, arm, _ = app_models
    threads = torch.get_num_threads()
    # frame_interval_s=0: every step reaches the client, so the stream can be checked step by step.
    yield build_studio(mdm, arm, device="cpu", threads=0, progress=lambda msg: None, frame_interval_s=0.0,
                       onnx_cache=tmp_path_factory.mktemp("onnx-cache"), eval_limit=8)
    torch.set_num_threads(threads)  # as the app does (auto); put back for the other test modules


@pytest.fixture(scope="module")
def server(studio):
    demo = build_app(studio)
    port = free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture
def prompts(studio, monkeypatch):
    """Every chat prompt the engine builds, decoded (special tokens kept)."""
    seen: list[str] = []
    build = studio.chat_prompt

    def spy(messages, room):
        ids, dropped = build(messages, room)
        seen.append(studio.mdm.tokenizer.decode(ids))
        return ids, dropped

    monkeypatch.setattr(studio, "chat_prompt", spy)
    return seen


def chat(client: Client, message: str, **settings):
    history, stats, box = client.predict(message, **{**FAST, **settings}, api_name="/chat")
    return history, stats


# ---------------------------------------------------------------------------------- rendering

def test_canvas_marks_masks_new_tokens_and_escapes(studio):
    tok, ids = studio.mdm.tokenizer, studio.mdm.ids
    word = tok("<b>rose</b>", add_special_tokens=False)["input_ids"]
    answer = word + [ids.mask] * 3 + [ids.eos, ids.mask]
    revealed = [False] * len(answer)
    revealed[0] = True
    conf = [0.0] * len(answer)
    conf[0] = 0.97
    page = render_canvas(tok, ids, answer, revealed=revealed, confidence=conf)
    assert mask_count(page) == 4
    assert "<b>" not in page and "&lt;" in page  # model text is never live HTML
    assert page.count('class="ld-new"') == 1 and "confidence 0.97" in page
    assert strip_tags(page).startswith("<b>rose</b>")
    # The history gets the text up to the end-of-text token, masks and specials dropped.
    assert decode_answer(tok, answer, ids) == "<b>rose</b>"
    # Given text (a poem's given line) is styled as given, apart from what the model reveals.
    given = tok("\nShall I", add_special_tokens=False)["input_ids"]
    canvas = [ids.mask] * 2 + given + [ids.eos]
    page = render_canvas(tok, ids, canvas, canvas=canvas)
    assert mask_count(page) == 2 and page.count('class="ld-given"') == 1 and "Shall I" in page
    causal = render_canvas(tok, ids, word, causal=True, after=given)
    assert 'class="ld-given ld-unseen"' in causal and causal.index("rose") < causal.index("Shall")


# ---------------------------------------------------------------------------------- chat

def test_two_turn_chat_puts_the_first_turn_in_the_prompt(server, studio, app_models, prompts):
    from llada_app.ui import chat_examples

    client = Client(server, verbose=False)
    stored = poems.stored_evaluation(studio.mdm.folder, poems.evaluation_key(studio.mdm, studio.decoding,
                                                                              poems.STORED_LIMITS))
    answered = chat_examples(studio, stored or [])  # questions the model was measured to answer (if any)
    q1 = answered[0] if answered else question(studio.corpus.split("train")[0].lines[0], "next")
    history, stats = chat(client, q1)
    assert [m["role"] for m in history] == ["user", "assistant"]
    a1 = message_text(history[1])
    assert "ld-canvas" not in a1 and MASK_GLYPH not in a1  # the final message is plain text
    assert "NFE" in stats and "tokens/s" in stats and "torch" in stats

    q2 = followup_question("next")
    history, _ = chat(client, q2)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert message_text(history[0]) == q1 and message_text(history[1]) == a1
    # The engine's second prompt really holds the first question and the first answer, as turns.
    second = prompts[-1]
    assert q1 in second and f"assistant<|end_header_id|>\n\n{a1}<|eot_id|>" in second
    assert second.endswith(f"{q2}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    if app_models[2]:  # the bundled model's follow-up answer depends on the first turn
        alone, _ = chat(Client(server, verbose=False), q2)  # a new session: the follow-up on its own
        assert message_text(alone[-1]) != message_text(history[3])


def test_chat_streams_steps_with_fewer_and_fewer_masks(server):
    client = Client(server, verbose=False)
    job = client.submit("Shall I compare thee to a summer's day?", **FAST, lengths="", api_name="/chat")
    job.result(timeout=120)  # one fixed canvas (a length search shows whichever candidate leads)
    frames = [message_text(out[0][-1]) for out in job.outputs()]
    counts = [mask_count(f) for f in frames]
    assert len(frames) >= 5, counts  # a live stream, not one answer at the end
    assert counts[0] == FAST["gen_length"]  # first frame: all masks, before any forward pass
    assert all(a >= b for a, b in zip(counts, counts[1:])), counts
    assert len(set(counts[:-1])) >= 4, counts  # masks really disappear step by step
    assert counts[-1] == 0 and "ld-canvas" not in frames[-1]


def test_animation_off_sends_only_the_start_and_the_answer(server):
    client = Client(server, verbose=False)
    job = client.submit("Shall I compare thee?", **FAST, animate=False, api_name="/chat")
    job.result(timeout=120)
    counts = [mask_count(message_text(out[0][-1])) for out in job.outputs()]
    assert counts[0] == FAST["gen_length"] and counts[-1] == 0 and len(counts) <= 3, counts


def test_invalid_settings_come_back_as_readable_errors(server, studio):
    client = Client(server, verbose=False)
    with pytest.raises(AppError, match="divisible by block length"):
        chat(client, "hello", gen_length=64, block_length=24)
    with pytest.raises(AppError, match="divisible by the number of blocks"):
        chat(client, "hello", gen_length=64, block_length=16, steps=30)
    with pytest.raises(AppError, match="prompt is empty"):
        chat(client, "   ")
    context = studio.mdm.model.config.max_sequence_length
    with pytest.raises(AppError, match="context"):
        chat(client, "rose " * context)
    with pytest.raises(AppError, match="threshold"):
        chat(client, "hello", mode="parallel threshold τ", remasking="random")
    # The server is fine and the failed requests left no trace in this session's conversation.
    history, _ = chat(client, "hello")
    assert [m["role"] for m in history] == ["user", "assistant"]


def test_a_long_chat_leaves_out_its_oldest_exchanges(studio):
    filler = "Shall I compare thee to a summer's day? " * 6
    history = []
    for k in range(12):
        history += [{"role": "user", "content": f"{k}: {filler}"}, {"role": "assistant", "content": filler}]
    messages = [*history, {"role": "user", "content": "And now?"}]
    room = studio.mdm.model.config.max_sequence_length - FAST["gen_length"]
    tok = studio.mdm.tokenizer
    assert len(chat_prompt_ids(tok, messages)) > room
    ids, dropped = studio.chat_prompt(messages, room)
    assert 0 < dropped < 12 and len(ids) <= room  # the fewest exchanges left out, the newest kept
    assert len(chat_prompt_ids(tok, messages[2 * (dropped - 1):])) > room
    assert ids == chat_prompt_ids(tok, messages[2 * dropped:])
    frames = list(studio.stream_chat(history, "And now?", ChatSettings(**FAST)))
    assert frames[-1].done and f"{dropped} oldest exchanges left out" in frames[-1].stats


def test_word_constraints_are_forced_and_bad_ones_refused(server):
    client = Client(server, verbose=False)
    job = client.submit("hello", **FAST, constraints="0:rose", api_name="/chat")
    history, _, _ = job.result(timeout=120)
    first = message_text(job.outputs()[0][0][-1])
    assert "rose" in strip_tags(first) and mask_count(first) < FAST["gen_length"]  # forced from the start
    assert message_text(history[-1]).startswith("rose")
    with pytest.raises(AppError, match="word constraints"):
        chat(client, "hello", constraints="rose")


def test_length_search_answers_within_the_lengths_and_refuses_bad_ones(studio, server):
    frames = list(studio.stream_chat([], "hello", ChatSettings(**FAST, lengths="6:8")))
    assert frames[-1].done and frames[-1].nfe == 8  # candidates side by side: the longest one's passes
    assert [f.done for f in frames].count(True) == 1
    kept = " (kept: confidence + likelihood)" if studio.decoding.likelihood_samples else ""  # the poem task's rule
    assert all(f.stats.endswith(f" · length search 6–8 tokens{kept}") for f in frames[1:])
    _, stats = chat(Client(server, verbose=False), "hello")  # the page's and the API's default
    if studio.mdm.card.answer_slots:  # a model trained here: both tabs search its SFT line lengths by default
        r = studio.corpus.line_lengths(studio.mdm.tokenizer)
        assert studio.answer_lengths == studio.default_settings().lengths == f"{r.start}:{r.stop - 1}"
        assert stats.endswith(f" · length search {r.start}–{r.stop - 1} tokens{kept}")
    else:
        assert studio.answer_lengths == studio.default_settings().lengths == ""
        assert "length search" not in stats
    with pytest.raises(AppError, match="length search: answer lengths take MIN:MAX"):
        chat(Client(server, verbose=False), "hello", lengths="8")
    with pytest.raises(AppError, match="length search: candidate lengths must be in"):
        chat(Client(server, verbose=False), "hello", lengths="4:40")


def test_two_concurrent_clients_keep_their_own_conversations(server, studio, prompts):
    sonnets = studio.corpus.split("train")
    questions = {"a": question(sonnets[0].lines[4], "next"),
                 "b": question(sonnets[1].lines[6], "previous")}
    results, errors = {}, []

    def converse(key):
        try:
            client = Client(server, verbose=False)
            chat(client, questions[key])
            results[key], _ = chat(client, followup_question("next"))
        except Exception as e:  # noqa: BLE001  (re-raised in the main thread below)
            errors.append(e)

    threads = [threading.Thread(target=converse, args=(k,)) for k in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for key, other in (("a", "b"), ("b", "a")):
        texts = [message_text(m) for m in results[key]]
        assert len(texts) == 4 and texts[0] == questions[key] and questions[other] not in texts
    # No prompt the engine built mixed the two conversations.
    for p in prompts:
        assert not (questions["a"] in p and questions["b"] in p)
    assert sum(questions["a"] in p for p in prompts) == 2 and sum(questions["b"] in p for p in prompts) == 2


class CountingDenoiser:
    """Wraps a denoiser: counts forward passes and makes each one slow enough to stop in the middle."""

    def __init__(self, inner, delay_s: float):
        self.inner, self.delay_s, self.calls = inner, delay_s, 0
        self.name, self.device, self.causal = inner.name, inner.device, inner.causal
        self.supports_cache, self.max_length = inner.supports_cache, inner.max_length

    def __call__(self, *args, **kwargs):
        self.calls += 1
        time.sleep(self.delay_s)
        return self.inner(*args, **kwargs)


def test_stop_cancels_between_steps_and_the_next_request_works(server, studio):
    slow = CountingDenoiser(studio.current_denoiser(), delay_s=0.05)
    original = studio.denoiser
    studio.denoiser = slow
    try:
        client = Client(server, verbose=False)
        job = client.submit("a long answer", gen_length=64, steps=64, block_length=64, pace_ms=0,
                            api_name="/chat")
        deadline = time.time() + 60
        while slow.calls < 3 and time.time() < deadline:
            time.sleep(0.02)
        job.cancel()
        time.sleep(1.0)
        stopped_at = slow.calls
        time.sleep(1.0)
        assert slow.calls == stopped_at < 64  # no forward pass after the stop
    finally:
        studio.denoiser = original
    history, _ = chat(Client(server, verbose=False), "hello again")
    assert [m["role"] for m in history] == ["user", "assistant"]


class FailingDenoiser(CountingDenoiser):
    def __call__(self, *args, **kwargs):
        raise RuntimeError("simulated out-of-memory")


def test_a_failing_or_overlong_request_does_not_take_the_server_down(server, studio):
    client = Client(server, verbose=False)
    limit = studio.time_limit_s
    studio.denoiser = FailingDenoiser(studio.current_denoiser(), 0.0)
    try:
        with pytest.raises(AppError, match="simulated out-of-memory"):
            chat(client, "hello")
        studio.denoiser = CountingDenoiser(studio.current_denoiser().inner, delay_s=0.05)
        studio.time_limit_s = 0.3
        with pytest.raises(AppError, match="time limit"):
            chat(client, "hello")
        assert studio.denoiser.calls < FAST["steps"]
    finally:
        studio.time_limit_s = limit
        studio.use_backend("torch")
    history, _ = chat(client, "hello")
    assert [m["role"] for m in history] == ["user", "assistant"]


def test_should_stop_ends_the_stream_between_steps_and_closes_the_sampler(studio):
    slow = CountingDenoiser(studio.current_denoiser(), delay_s=0.0)
    studio.denoiser = slow
    try:
        frames = []
        with pytest.raises(Stopped, match="step 3"):
            for frame in studio.stream_chat([], "hello", ChatSettings(**FAST), should_stop=lambda: len(frames) >= 3):
                frames.append(frame)
        assert slow.calls == 3  # the step that saw the stop was the last forward pass
    finally:
        studio.use_backend("torch")


def test_should_stop_ends_the_poem_stream_and_closes_both_samplers(studio):
    mdm = CountingDenoiser(studio.current_denoiser(), delay_s=0.0)
    arm_original = studio._arm_denoiser
    arm = CountingDenoiser(arm_original, delay_s=0.0)
    studio.denoiser, studio._arm_denoiser = mdm, arm
    try:
        frames = []
        with pytest.raises(Stopped, match="step 3"):
            for pf in studio.stream_poem("From fairest creatures we desire increase,", "next", "chat",
                                         ChatSettings(**FAST), should_stop=lambda: len(frames) >= 3):
                frames.append(pf)
        # Each poem frame advances the MDM, then the ARM, by one step (the first shows blank canvases).
        # The MDM's third step saw the stop: no forward pass ran after it, and the ARM stopped at step 2.
        assert mdm.calls == 3 and arm.calls == 2
        assert not frames[-1].mdm.done and not frames[-1].arm.done
    finally:
        studio._arm_denoiser = arm_original
        studio.use_backend("torch")


@pytest.mark.parametrize("mode", list(DECODING_MODES))
def test_every_decoding_mode_answers(server, app_models, mode):
    history, stats = chat(Client(server, verbose=False), "hello", mode=mode, threshold=0.5,
                          gen_length=32, block_length=16, steps=32, lengths="")
    assert MASK_GLYPH not in message_text(history[-1]) and "done" in stats
    nfe = int(stats.split("NFE ")[1].split(" ")[0])
    if DECODING_MODES[mode][0]:  # τ = 0.5: a trained model reveals several tokens in some steps
        assert nfe < 32 if app_models[2] else nfe <= 32
    else:  # the fixed schedule: 16 tokens per block in 16 steps, one forward pass each, caches or not
        assert nfe == 32


# ---------------------------------------------------------------------------------- poems

@pytest.mark.parametrize("direction", ["next", "previous"])
@pytest.mark.parametrize("protocol", ["completion", "chat"])
def test_poem_runs_both_models_in_both_directions(server, studio, direction, protocol):
    client = Client(server, verbose=False)
    line = studio.corpus.split("train")[0].lines[1]
    job = client.submit(line, direction, protocol, pace_ms=0, api_name="/poem")
    mdm_html, arm_html, verdict, result = job.result(timeout=120)
    assert result["protocol"] == protocol
    assert result["expected"] == studio.corpus.expected(line, direction) is not None
    assert isinstance(result["mdm"], str) and isinstance(result["arm"], str)
    assert "ld-canvas" in mdm_html and "ld-canvas" in arm_html and MASK_GLYPH not in mdm_html
    assert "Expected" in verdict and result["expected"] in verdict
    frames = job.outputs()
    arm_lengths = [len(strip_tags(f[1])) for f in frames]
    assert len(frames) >= 3 and arm_lengths[0] < arm_lengths[-1]  # the ARM grows left to right
    if protocol == "chat":
        assert result["question"] == question(line, direction)
        assert mask_count(frames[0][0]) == studio.decoding.gen_length  # the MDM starts from all masks
        assert "ld-given" not in mdm_html
    else:  # the given line sits in both canvases as given text; the MDM's gap starts as masks beside it
        shortest = studio.decoding.gap_lengths().start
        assert mask_count(frames[0][0]) == shortest and line in strip_tags(frames[0][0])
        assert "ld-given" in mdm_html and "ld-given" in arm_html
        gap_first = direction == "previous"
        assert (strip_tags(mdm_html).index(line.split()[0]) > 0) == gap_first


def test_poem_outside_the_corpus_and_empty_line(server):
    client = Client(server, verbose=False)
    *_, result = client.predict("A line that no sonnet has", "next", "completion", api_name="/poem")
    assert result["expected"] is None and result["mdm_correct"] is None
    with pytest.raises(AppError, match="line of a poem"):
        client.predict("", "next", "completion", api_name="/poem")
    with pytest.raises(AppError, match="not in the list of choices"):  # the page's radio refuses it
        client.predict("Shall I", "next", "prose", api_name="/poem")
    with pytest.raises(AppError, match="the line is too long"):
        client.predict("rose " * 400, "next", "completion", api_name="/poem")


def test_evaluation_chart_tells_the_models_apart():
    """The base and chat MDMs (and the twin) each get their own colour in the bars and the legend."""
    from llada_app.ui import evaluation_chart

    results = [poems.EvalResult(m, kind, protocol, "heldout", 0.5, 0.25, 4)
               for m, kind, protocol in (("base", "MDM", "completion"), ("chat", "MDM", "chat"),
                                         ("twin", "ARM", "completion"), ("twin", "ARM", "chat"))]
    ax = evaluation_chart(results).axes[0]
    legend = {t.get_text(): h.get_facecolor() for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}
    measured = [legend[f"{m} [{k}]"] for m, k in (("base", "MDM"), ("chat", "MDM"), ("twin", "ARM"))]
    assert len(legend) == 4 and len(set(measured)) == 3
    twin_bars = [p for p in ax.patches if p.get_facecolor() == legend["twin [ARM]"]]
    assert len(twin_bars) == 4  # one model, both protocols x both directions


def test_evaluation_table_and_chart(server, studio):
    """Both protocols × both models, measured through the page, then the quoted paper rows. Each figure
    is the share of its answers that match the corpus line, and an answer is what the poem tab gives."""
    table, plot, note = Client(server, verbose=False).predict(api_name="/evaluate")
    assert table["headers"] == ["model", "protocol", "next line", "previous line", "pairs", "source"]
    measured = [row for row in table["data"] if row[5] == "measured now"]
    assert [(row[0].rsplit("[", 1)[1], row[1]) for row in measured] == [
        ("MDM]", "completion"), ("MDM]", "chat"), ("ARM]", "completion"), ("ARM]", "chat")]
    assert all(row[4] == 8 for row in measured) and "Measured now" in note
    quoted = [row for row in table["data"] if row[5].startswith("quoted")]
    assert ["LLaDA-8B-Instruct", "chat (Chinese couplets)", 51.8, 45.6, 496] == quoted[0][:5]
    assert plot["type"] == "matplotlib" and plot["plot"]
    results = studio.evaluate()  # the same evaluation in-process, with every answer kept
    for row, r in zip(measured, results):
        for col, direction in ((2, "next"), (3, "previous")):
            items = [i for i in r.items if i["direction"] == direction]
            right = [poems.normalise(i["answer"]) == poems.normalise(studio.corpus.expected(i["given"], direction))
                     for i in items]
            assert row[col] == round(100 * sum(right) / len(right), 1)
    mdm_completion = results[0]
    for item in [mdm_completion.items[0], mdm_completion.items[-1]]:  # the tab's answer for the same line
        *_, result = Client(server, verbose=False).predict(item["given"], item["direction"], "completion",
                                                           pace_ms=0, api_name="/poem")
        assert result["mdm"] == item["answer"]


# ---------------------------------------------------------------------------------- back ends

def test_switching_to_onnx_before_export_is_refused(server):
    with pytest.raises(AppError, match="Export the model to ONNX first"):
        Client(server, verbose=False).predict("onnx", api_name="/backend")


def test_export_then_switch_backend_without_breaking_a_running_request(server, studio, app_models):
    """Export (with parity) through the API, switch to ONNX while a chat is running, and back."""
    client = Client(server, verbose=False)
    status, report = client.predict(api_name="/export")
    assert report["passed"] is True and "parity **passed**" in status and "| batch 1" in status
    slow = CountingDenoiser(studio.current_denoiser(), delay_s=0.05)
    studio.denoiser = slow
    try:
        running = Client(server, verbose=False).submit("hello", **FAST, api_name="/chat")
        while slow.calls < 2:
            time.sleep(0.02)
        Client(server, verbose=False).predict("onnx", api_name="/backend")
        _, stats, _ = running.result(timeout=120)
        assert "back end: torch" in stats  # finished on the back end it started with
        onnx_history, stats = chat(Client(server, verbose=False), "hello")
        assert "back end: onnx" in stats
    finally:
        studio.use_backend("torch")
    torch_history, _ = chat(Client(server, verbose=False), "hello")
    assert message_text(onnx_history[-1]) == message_text(torch_history[-1])  # same greedy answer
    # `python app.py --backend onnx` reuses the cached export of the same weights.
    mdm, arm, _ = app_models
    started = time.perf_counter()
    again = build_studio(mdm, None, backend="onnx", device="cpu", progress=lambda m: None,
                         onnx_cache=studio.onnx_cache)
    assert again.current_denoiser().name == "onnx" and time.perf_counter() - started < 10


def test_small_models_run_on_one_cpu_thread(studio, monkeypatch):
    from llada_app import studio as studio_module
    from llada_app.studio import cpu_threads

    assert cpu_threads(studio.mdm, 0) == 1 and cpu_threads(studio.mdm, 3) == 3  # the models here are small
    monkeypatch.setattr(studio_module, "SMALL_MODEL", 10)  # as if it were a big one: torch's own default
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    assert cpu_threads(studio.mdm, 0) == 7


def test_model_panel_and_cli_defaults(studio):
    from app import parse_args
    from llada_app.loading import DEFAULT_MODEL
    from llada_app.ui import model_markdown

    table = model_markdown(studio)
    for field in ("parameters", "device", "dtype", "back end", studio.mdm.name):
        assert field in table
    args = parse_args([])
    assert (args.model, args.host, args.port, args.share, args.backend) == (DEFAULT_MODEL, "127.0.0.1", 7860,
                                                                            False, "torch")
    assert args.arm.endswith("sonnets-arm")
    assert parse_args(["--model", "elsewhere"]).arm is None and parse_args(["--arm", "none"]).arm is None


# ---------------------------------------------------------------------------------- hostile and careless input

def test_a_huge_length_range_is_refused_while_the_server_keeps_answering(server):
    """`lengths` with a 26-digit maximum once walked a range of 1e26 candidates under the GIL and froze
    every client; now it is refused on sight, and another client's /config comes back at once."""
    import urllib.request

    done = {}

    def hostile():
        try:
            chat(Client(server, verbose=False), "hello", lengths="1:99999999999999999999999999")
        except AppError as e:
            done["error"] = str(e)

    t = threading.Thread(target=hostile)
    t.start()
    started = time.perf_counter()
    with urllib.request.urlopen(server + "config", timeout=10) as r:
        assert r.status == 200
    waited = time.perf_counter() - started
    t.join(timeout=60)
    assert "answer lengths take MIN:MAX" in done["error"] and waited < 2.0, (done, waited)
    with pytest.raises(AppError, match="at most 256"):
        chat(Client(server, verbose=False), "hello", lengths="1:1000")


@pytest.mark.parametrize("field, value, message", [
    ("temperature", float("nan"), "temperature must be a finite number"),
    ("cfg_scale", float("inf"), "cfg scale must be a finite number"),
    ("gen_length", float("nan"), "gen length must be a finite number"),
    ("steps", 2.5, "steps must be a whole number"),
])
def test_bad_numbers_get_clear_errors(studio, field, value, message):
    settings = ChatSettings(**{**FAST, field: value})
    with pytest.raises(ValueError, match=message):
        studio.stream_chat([], "hello", settings)


def test_text_that_is_not_valid_unicode_is_refused(studio):
    from llada_app.studio import RequestError

    with pytest.raises(RequestError, match="lone surrogate"):
        studio.stream_chat([], "hello \ud800", ChatSettings(**FAST))
    with pytest.raises(RequestError, match="lone surrogate"):
        studio.stream_poem("Shall I \udfff", "next", "completion", ChatSettings(**FAST))
    with pytest.raises(RequestError, match="role"):
        studio.stream_chat([{"role": "system?", "content": "x"}], "hello", ChatSettings(**FAST))


def test_a_refused_chat_never_reaches_the_conversation(studio):
    """The page checks a request before queueing it: the check raises (a pop-up), the chat never runs,
    so the conversation and its state stay as they were."""
    import gradio as gr

    from llada_app.ui import StopSignal, check_chat

    names = list(FAST)
    with pytest.raises(gr.Error, match="prompt is empty"):
        check_chat(studio, names, "   ", [], StopSignal(), *FAST.values())
    context = studio.mdm.model.config.max_sequence_length
    with pytest.raises(gr.Error, match="context"):
        check_chat(studio, names, "rose " * context, [], StopSignal(), *FAST.values())
    assert check_chat(studio, names, "hello", [], StopSignal(), *FAST.values()) is None


def test_the_upload_route_stores_nothing(server):
    import urllib.error
    import urllib.request

    body = b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.bin\"\r\n\r\n" + b"x" * 4096 + \
        b"\r\n--b--\r\n"
    req = urllib.request.Request(server + "gradio_api/upload", data=body, method="POST",
                                 headers={"Content-Type": "multipart/form-data; boundary=b"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 413


def test_one_evaluation_at_a_time_with_a_stop_and_chat_answering_meanwhile(studio, server):
    """The evaluation runs in its own slot: a chat is answered while it runs, a second evaluation is
    refused at once (not queued behind it), and Stop ends it between two batches."""
    from llada_app.studio import RequestError

    slow = CountingDenoiser(studio.current_denoiser(), delay_s=0.02)
    studio.denoiser = slow
    stop = threading.Event()
    outcome = {}

    def evaluate():
        try:
            studio.evaluate(should_stop=stop.is_set)
        except Stopped as e:
            outcome["stopped"] = str(e)

    try:
        t = threading.Thread(target=evaluate)
        t.start()
        while slow.calls < 2:
            time.sleep(0.01)
        with pytest.raises(RequestError, match="already running"):
            studio.evaluate()
        history, _ = chat(Client(server, verbose=False), "hello")  # served while the evaluation runs
        assert [m["role"] for m in history] == ["user", "assistant"]
        stop.set()
        t.join(timeout=120)
        assert "evaluation stopped at" in outcome["stopped"]
    finally:
        studio.use_backend("torch")
    studio.eval_time_limit_s, limit = 0.0, studio.eval_time_limit_s
    try:
        with pytest.raises(RequestError, match="time limit"):
            studio.evaluate()
    finally:
        studio.eval_time_limit_s = limit


def test_a_broken_twin_only_disables_the_comparison(app_models, tmp_path):
    import shutil

    broken = tmp_path / "arm"
    shutil.copytree(app_models[1], broken)
    (broken / "config.json").write_text("[1, 2]")
    studio = build_studio(app_models[0], str(broken), device="cpu", progress=lambda m: None)
    assert studio.arm is None and "must hold a JSON object" in studio.arm_note


def test_race_answers_the_same_question_with_two_decoders(server, studio):
    """Two modes side by side: both animated, each with its NFE, seconds and tokens/s, and whether their
    answers agree; the back-end race needs an export first."""
    client = Client(server, verbose=False)
    job = client.submit("What is the next line?", "threshold + dual cache", **{**FAST, "lengths": ""},
                        api_name="/race")
    a, b, verdict = job.result(timeout=120)
    frames = job.outputs()
    assert len(frames) >= 3 and mask_count(frames[0][0]) == mask_count(frames[0][1]) == FAST["gen_length"]
    for side in (a, b):
        assert "done" in side and "NFE" in side and " s · " in side and "tokens/s" in side and MASK_GLYPH not in side
    nfe = [int(side.split("NFE ")[1].split(" ")[0]) for side in (a, b)]
    assert nfe[0] == 32 and nfe[1] <= 32  # A: vanilla, one token per step; B: threshold + dual cache
    same = strip_tags(a).split("done")[0] == strip_tags(b).split("done")[0]
    assert verdict.startswith("**Same answer**" if same else "**Different answers.**")
    if studio._onnx is None:
        with pytest.raises(AppError, match="Export the model to ONNX first"):
            client.predict("hello", "same mode, other back end", **FAST, api_name="/race")


def test_the_page_shows_the_stored_evaluation_of_the_loaded_models(app_models, tmp_path):
    """The bundled models carry their training run's evaluation: the poem tab's text, its table and its
    examples come from it at once. Another model's weights under the same folder get none of it."""
    import shutil

    from llada_app.ui import chat_examples, poem_examples, poem_intro

    mdm, arm, bundled = app_models
    if not bundled:
        return  # tiny random models carry no stored evaluation: the "no figures yet" path is tested below
    from llada_app.loading import DEFAULT_BASE

    studio = build_studio(mdm, arm, base=DEFAULT_BASE, device="cpu", progress=lambda m: None)
    results, note = studio.stored_evaluation()
    assert note == "" and {(r.kind, r.protocol, r.split) for r in results} >= {
        ("MDM", "completion", "heldout"), ("MDM", "chat", "heldout"), ("ARM", "completion", "heldout"),
        ("ARM", "chat", "heldout")}
    completion = next(r for r in results if r.kind == "MDM" and r.protocol == "completion" and r.split == "heldout")
    assert completion.model == "sonnets-mdm-base"  # the completion protocol runs on the pre-trained base
    intro = poem_intro(studio, results)
    assert "sonnets 26–30" in intro and f"{100 * completion.reversal:.1f}%" in intro
    rows, labels = poem_examples(studio, results)
    showcase = [r for r, label in zip(rows, labels) if "MDM right, twin wrong" in label]
    assert showcase and all(studio.corpus.lookup(r[0]).held_out for r in showcase)
    assert all("Sonnet" not in q or "first line" not in q for q in chat_examples(studio, results))
    # the same folder with other weights: refused, the page says to measure again
    other = tmp_path / "arm"
    shutil.copytree(arm, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    first = next(iter(weights))
    weights[first] = weights[first] * 0.5
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    changed = build_studio(mdm, str(other), base=DEFAULT_BASE, device="cpu", progress=lambda m: None)
    results, note = changed.stored_evaluation()
    assert "computed for other weights" in note and not any(r.kind == "ARM" for r in results)
