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
from llada_app.generation import parse_lengths
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
    page, masks = render_canvas(tok, answer, revealed, conf, ids)
    assert masks == 4 and page.count(MASK_GLYPH) == 4
    assert "<b>" not in page and "&lt;" in page  # model text is never live HTML
    assert page.count('class="ld-new"') == 1 and "confidence 0.97" in page
    assert strip_tags(page).replace("&lt;", "<").replace("&gt;", ">").startswith("<b>rose</b>")
    # The history gets the text up to the end-of-text token, masks and specials dropped.
    assert decode_answer(tok, answer, ids) == "<b>rose</b>"


# ---------------------------------------------------------------------------------- chat

def test_two_turn_chat_puts_the_first_turn_in_the_prompt(server, studio, app_models, prompts):
    client = Client(server, verbose=False)
    sonnet = studio.corpus.split("train")[0]
    q1 = poems.question(sonnet.lines[0], "next")
    history, stats = chat(client, q1)
    assert [m["role"] for m in history] == ["user", "assistant"]
    a1 = message_text(history[1])
    assert "ld-canvas" not in a1 and MASK_GLYPH not in a1  # the final message is plain text
    assert "NFE" in stats and "tokens/s" in stats and "torch" in stats

    q2 = poems.followup_question("next")
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
    job = client.submit("Shall I compare thee to a summer's day?", **FAST, api_name="/chat")
    job.result(timeout=120)
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
    assert all(f.stats.endswith(" · length search 6–8 tokens") for f in frames[1:])
    _, stats = chat(Client(server, verbose=False), "hello")  # the page's and the API's default
    if studio.answer_slots:  # a model trained here: both tabs search its SFT line lengths by default
        r = poems.sft_line_lengths(studio.corpus, studio.mdm.tokenizer)
        assert studio.answer_lengths == studio.default_settings().lengths == f"{r.start}:{r.stop - 1}"
        assert stats.endswith(f" · length search {r.start}–{r.stop - 1} tokens")
    else:
        assert studio.answer_lengths == studio.default_settings().lengths == ""
        assert "length search" not in stats
    with pytest.raises(AppError, match="length search: answer lengths take MIN:MAX"):
        chat(Client(server, verbose=False), "hello", lengths="8")
    with pytest.raises(AppError, match="length search: candidate lengths must be in"):
        chat(Client(server, verbose=False), "hello", lengths="4:40")


def test_two_concurrent_clients_keep_their_own_conversations(server, studio, prompts):
    sonnets = studio.corpus.split("train")
    questions = {"a": poems.question(sonnets[0].lines[4], "next"),
                 "b": poems.question(sonnets[1].lines[6], "previous")}
    results, errors = {}, []

    def converse(key):
        try:
            client = Client(server, verbose=False)
            chat(client, questions[key])
            results[key], _ = chat(client, poems.followup_question("next"))
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
        self.name, self.device = inner.name, inner.device
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
    arm.causal = True
    studio.denoiser, studio._arm_denoiser = mdm, arm
    try:
        frames = []
        with pytest.raises(Stopped, match="step 3"):
            for pf in studio.stream_poem("From fairest creatures we desire increase,", "next", ChatSettings(**FAST),
                                         should_stop=lambda: len(frames) >= 3):
                frames.append(pf)
        # Each poem frame advances the MDM, then the ARM, by one step (the first shows blank canvases).
        # The MDM's third step saw the stop: no forward pass ran after it, and the ARM stopped at step 2.
        assert mdm.calls == 3 and arm.calls == 2
        assert not frames[-1].mdm.done and not frames[-1].arm.done
    finally:
        studio._arm_denoiser = arm_original
        studio.use_backend("torch")


@pytest.mark.parametrize("mode", list(DECODING_MODES))
def test_every_decoding_mode_answers(server, mode):
    history, stats = chat(Client(server, verbose=False), "hello", mode=mode, threshold=0.5,
                          gen_length=32, block_length=16, steps=32)
    assert MASK_GLYPH not in message_text(history[-1])
    nfe = int(stats.split("NFE ")[1].split(" ")[0])
    assert 1 <= nfe <= 32 and "done" in stats


# ---------------------------------------------------------------------------------- poems

@pytest.mark.parametrize("direction", ["next", "previous"])
def test_poem_runs_both_models_in_both_directions(server, studio, direction):
    client = Client(server, verbose=False)
    line = studio.corpus.split("train")[0].lines[1]
    job = client.submit(line, direction, pace_ms=0, api_name="/poem")
    mdm_html, arm_html, verdict, result = job.result(timeout=120)
    assert result["question"] == poems.question(line, direction)
    assert result["expected"] == studio.corpus.expected(line, direction) is not None
    assert isinstance(result["mdm"], str) and isinstance(result["arm"], str)
    assert "ld-canvas" in mdm_html and "ld-canvas" in arm_html and MASK_GLYPH not in mdm_html
    assert "Expected" in verdict and result["expected"] in verdict
    # Both sides were animated: the MDM from all masks, the ARM growing left to right.
    frames = job.outputs()
    assert len(frames) >= 3 and mask_count(frames[0][0]) == (studio.answer_slots or poems.GEN_LENGTH)
    arm_lengths = [len(strip_tags(f[1])) for f in frames]
    assert arm_lengths[0] < arm_lengths[-1]


def test_poem_outside_the_corpus_and_empty_line(server):
    client = Client(server, verbose=False)
    *_, result = client.predict("A line that no sonnet has", "next", api_name="/poem")
    assert result["expected"] is None and result["mdm_correct"] is None
    with pytest.raises(AppError, match="line of a poem"):
        client.predict("", "next", api_name="/poem")


def test_evaluation_table_and_chart(server, studio):
    table, plot = Client(server, verbose=False).predict(api_name="/evaluate")
    assert table["headers"] == ["model", "forward", "reversal", "pairs"]
    kinds = [row[0].rsplit("[", 1)[1] for row in table["data"]]
    assert kinds == ["MDM]", "ARM]"]
    assert all(0 <= row[1] <= 100 and 0 <= row[2] <= 100 and row[3] == 8 for row in table["data"])
    assert plot["type"] == "matplotlib" and plot["plot"]
    # the MDM is scored as the poem tab answers: with its default length search, if it has one
    lengths = parse_lengths(studio.answer_lengths)
    mdm = studio.mdm
    want = poems.evaluate(mdm.model, mdm.tokenizer, mdm.ids, studio.corpus, "heldout", 8, multiturn=False,
                          gen_length=studio.answer_slots or poems.GEN_LENGTH, length_search=lengths)
    assert table["data"][0][1:3] == [round(100 * want.forward, 1), round(100 * want.reversal, 1)]
    assert ("length search" in table["data"][0][0]) == bool(lengths)


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


def test_small_models_run_on_one_cpu_thread(studio):
    from llada_app.studio import cpu_threads

    assert torch.get_num_threads() == 1 == cpu_threads(studio.mdm, 0)  # the bundled model is small
    assert cpu_threads(studio.mdm, 3) == 3


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
