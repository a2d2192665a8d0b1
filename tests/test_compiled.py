"""The captured fast path (llada_app/compiled.py) against the eager denoiser, on the same inputs."""
from dataclasses import replace

import pytest
import torch

from llada_app.backends import TorchDenoiser
from llada_app.compiled import CompiledDenoiser, _widen
from llada_app.generation import GenerationConfig, generate, length_search_steps, pad_prompts, sample_steps
from llada_app.modeling import LLaDAModelLM

from conftest import tiny_config

MODES = {
    "vanilla": GenerationConfig(gen_length=32, block_length=16, steps=32),
    "threshold+dual": GenerationConfig(gen_length=32, block_length=16, steps=32, threshold=0.5, cache="dual"),
    "threshold": GenerationConfig(gen_length=32, block_length=16, steps=32, threshold=0.5),
    "dual": GenerationConfig(gen_length=32, block_length=16, steps=16, cache="dual"),
    "prefix": GenerationConfig(gen_length=32, block_length=16, steps=16, cache="prefix"),
    "factor+dual+cfg": GenerationConfig(gen_length=32, block_length=16, steps=32, factor=1.0, cache="dual",
                                        cfg_scale=1.0),
}


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    torch.manual_seed(3)  # large weights: proposals vary with position and context, confidences untied
    return LLaDAModelLM(tiny_config(tiny_tokenizer, n_layers=1, init_std=0.3)).eval()


@pytest.fixture(scope="module")
def batch(tiny_tokenizer, ids):
    """Two left-padded prompts of different lengths: a padding mask, and a canvas (13 + 32) that is no bucket."""
    a = tiny_tokenizer("From fairest creatures")["input_ids"]
    b = tiny_tokenizer("When forty winters shall besiege thy brow, and dig")["input_ids"]
    return pad_prompts([a, b], pad_id=ids["eos_id"])


def _steps(denoiser, prompt, mask, cfg, ids):
    return list(sample_steps(denoiser, prompt, mask, cfg, **ids))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("rows", [1, 2])
def test_padded_calls_give_the_eager_tokens_and_steps(model, batch, ids, mode, rows):
    """batch_sizes=() runs the padded computation eagerly: the padding, the block positions as a tensor,
    the tensor start and the widened cache alone must change nothing, step by step."""
    prompt, mask = batch
    prompt, mask = prompt[-rows:], (None if rows == 1 else mask)
    padded = CompiledDenoiser(model, bucket=32, batch_sizes=())
    want, got = _steps(TorchDenoiser(model), prompt, mask, MODES[mode], ids), _steps(padded, prompt, mask, MODES[mode], ids)
    assert [s.nfe for s in got] == [s.nfe for s in want]
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w.ids, g.ids) and torch.equal(w.revealed, g.revealed)
        assert torch.allclose(w.confidence, g.confidence, atol=1e-6)
    assert padded.calls["eager"] == want[-1].nfe  # nothing was compiled


def test_deferred_sync_reads_the_block_done_flag_one_step_late(model, batch, ids):
    """Same Steps as the eager sampler's (numbers, done flags, tokens), one extra forward per block."""
    prompt = batch[0][-1:]
    cfg = MODES["threshold+dual"]
    want = _steps(TorchDenoiser(model), prompt, None, cfg, ids)
    got = _steps(CompiledDenoiser(model, bucket=32, batch_sizes=(), deferred_sync=True), prompt, None, cfg, ids)
    assert [s.step for s in got] == [s.step for s in want] == list(range(1, len(want) + 1))
    assert [(s.block, s.done) for s in got] == [(s.block, s.done) for s in want]
    assert all(torch.equal(w.ids, g.ids) for w, g in zip(want, got, strict=True))
    assert got[-1].nfe == want[-1].nfe + cfg.num_blocks


def test_the_length_search_runs_through_it(model, batch, ids):
    """Rows leave the batch as candidates finish: those calls run eagerly, with the same answers."""
    prompt = batch[0][-1:]
    cfg = MODES["dual"]
    want = list(length_search_steps(TorchDenoiser(model), prompt, None, cfg, [5, 12, 31], **ids))[-1]
    padded = CompiledDenoiser(model, bucket=32, batch_sizes=(3,))
    got = list(length_search_steps(padded, prompt, None, cfg, [5, 12, 31], **ids))[-1]
    assert torch.equal(want.ids, got.ids)
    assert padded.calls["eager"] > 0


def test_torch_compile_of_the_same_steps_gives_the_same_tokens(model, batch, ids):
    """The compiled graphs (inductor on a CPU; CUDA graphs too on a GPU) against eager."""
    from torch._dynamo.utils import counters

    prompt = batch[0][-1:]
    compiled = CompiledDenoiser(model, bucket=32)
    for mode in ("vanilla", "threshold+dual"):
        cfg = MODES[mode]
        want = generate(TorchDenoiser(model), prompt, None, cfg, **ids)
        assert torch.equal(generate(compiled, prompt, None, cfg, **ids), want), mode
        # a second prompt length in the same bucket replays the same graphs: nothing is compiled again
        frames = counters["stats"]["unique_graphs"]
        assert torch.equal(generate(compiled, prompt[:, 1:], None, cfg, **ids),
                           generate(TorchDenoiser(model), prompt[:, 1:], None, cfg, **ids)), mode
        assert counters["stats"]["unique_graphs"] == frames, mode
    assert compiled.calls["full"] > 0 and compiled.calls["block"] > 0 and compiled.calls["eager"] == 0


def test_widen_reuses_the_padded_buffer_and_copies_anything_else():
    buf = torch.randn(2, 3, 8, 4)
    view = buf[:, :, :5]
    wide = _widen(view, 8)
    assert wide.data_ptr() == buf.data_ptr() and torch.equal(wide, buf)
    dropped = torch.cat([view[1:]])  # a new tensor of the real length (rows dropped)
    wide = _widen(dropped, 8)
    assert wide.shape == (1, 3, 8, 4) and torch.equal(wide[:, :, :5], buf[1:, :, :5]) and not wide[:, :, 5:].any()


def test_refuses_an_autoregressive_model(tiny_tokenizer):
    with pytest.raises(ValueError, match="masked-diffusion"):
        CompiledDenoiser(LLaDAModelLM(tiny_config(tiny_tokenizer, n_layers=1, causal=True)))


def test_a_tensor_start_equals_the_int_start(model, batch):
    """The model's cache rule with a 0-dim tensor start (what the compiled block step passes)."""
    x = batch[0][-1:]
    with torch.no_grad():
        past = model(x, use_cache=True).past_key_values
        a = model(x[:, 4:9], past_key_values=past, start=4).logits
        b = model(x[:, 4:9], past_key_values=past, start=torch.tensor(4)).logits
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="tensor start"):
        model(x[:, 4:9], start=torch.tensor(4))


def test_the_app_chooses_the_path_at_start_up(app_models):
    """--compile auto is eager on a CPU; on: the MDM (and its base) captured, the autoregressive twin eager."""
    from app import parse_args
    from llada_app.loading import ModelLoadError
    from llada_app.studio import build_studio

    assert parse_args([]).compile == "auto"
    mdm, arm, _ = app_models
    auto = build_studio(mdm, arm, device="cpu", progress=lambda m: None)
    assert type(auto.current_denoiser()) is TorchDenoiser and auto.describe()["backend"] == "torch"
    on = build_studio(mdm, arm, device="cpu", progress=lambda m: None, compile="on")
    assert isinstance(on.current_denoiser(), CompiledDenoiser) and on.describe()["backend"] == "torch (compiled)"
    assert type(on._arm_denoiser) is TorchDenoiser
    with pytest.raises(ModelLoadError, match="compile"):
        build_studio(mdm, arm, device="cpu", progress=lambda m: None, compile="yes")
