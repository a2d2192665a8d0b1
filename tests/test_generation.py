"""The sampler against a plain reference loop written here from the reference semantics, plus its options and errors."""
import math
from dataclasses import replace

import pytest
import torch

from llada_app.backends import DenoiserOutput, TorchDenoiser
from llada_app.generation import (GenerationConfig, Step, _search, arm_steps, block_schedule, candidate_steps, generate,
                                  generate_arm, generate_length_search, length_search_steps, pad_prompts,
                                  parse_constraints, sample_steps)
from llada_app.modeling import LLaDAModelLM

from conftest import tiny_config


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharp_model(tiny_tokenizer):
    """A random model with larger weights than the default init, so that its proposals vary with
    position and context (with std 0.02 every position proposes the same token) and confidences
    have no ties."""
    torch.manual_seed(1)
    return LLaDAModelLM(tiny_config(tiny_tokenizer, init_std=0.3)).eval()


@pytest.fixture(scope="module")
def one_layer_model(tiny_tokenizer):
    """With one layer, K/V depend only on each token and its position, so a cache filled at the
    start of a block stays exact while the block is decoded: cached decoding must equal vanilla."""
    torch.manual_seed(2)
    return LLaDAModelLM(tiny_config(tiny_tokenizer, n_layers=1, init_std=0.3)).eval()


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    a = tiny_tokenizer("From fairest creatures")["input_ids"]
    b = tiny_tokenizer("When forty winters shall besiege thy brow, and dig")["input_ids"]
    assert len(a) != len(b)
    return a, b


class Counting:
    """Wraps a denoiser, counting calls and optionally biasing some logits (and hiding cache support)."""

    def __init__(self, inner, bias: dict[int, float] | None = None, supports_cache: bool | None = None):
        self.inner, self.bias, self.calls, self.rows = inner, bias or {}, 0, 0
        self.widths, self.with_mask = [], []  # per call: input width, whether a padding mask came with it
        self.name, self.device, self.max_length, self.causal = inner.name, inner.device, inner.max_length, inner.causal
        self.supports_cache = inner.supports_cache if supports_cache is None else supports_cache

    def __call__(self, *args, **kw):
        self.calls += 1
        self.rows += args[0].shape[0]
        self.widths.append(args[0].shape[1])
        self.with_mask.append(len(args) > 1 and args[1] is not None)
        out = self.inner(*args, **kw)
        logits = out.logits.clone()
        for tok, b in self.bias.items():
            logits[..., tok] += b
        return DenoiserOutput(logits, out.past_key_values)


# -- the reference loop, written straight from the reference ----------------------------------------------

@torch.no_grad()
def reference_generate(model, prompt, attention_mask, *, steps, gen_length, block_length, cfg_scale=0.0,
                       mask_id):
    """Temperature 0, low-confidence remasking, full logits every step, top-k per row with torch.topk."""
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long)
    x[:, :P] = prompt
    attn = None
    if attention_mask is not None:
        attn = torch.cat([attention_mask, torch.ones(B, gen_length, dtype=attention_mask.dtype)], 1)
    n_blocks = gen_length // block_length
    S = steps // n_blocks
    for nb in range(n_blocks):
        lo, hi = P + nb * block_length, P + (nb + 1) * block_length
        n = (x[:, lo:hi] == mask_id).sum(1)  # [B]
        counts = [[int(n[j]) // S + (i < int(n[j]) % S) for i in range(S)] for j in range(B)]
        for i in range(S):
            masked = x == mask_id
            if cfg_scale > 0:
                x_u = x.clone()
                x_u[:, :P] = mask_id
                a2 = None if attn is None else torch.cat([attn, attn])
                both = model(torch.cat([x, x_u]), attention_mask=a2).logits
                cond, uncond = both.chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model(x, attention_mask=attn).logits
            # As the official code: the confidence is the softmax of the raw logits (p(MASK) included);
            # the mask token is kept out of the proposal only (see generation.py).
            x0 = logits.index_fill(-1, torch.tensor([mask_id]), -torch.inf).argmax(-1)
            p = torch.softmax(logits.float(), -1).gather(-1, x0[..., None]).squeeze(-1)
            p[:, hi:] = -torch.inf
            conf = torch.where(masked, p, -torch.inf)
            for j in range(B):
                _, sel = torch.topk(conf[j], k=counts[j][i])
                x[j, sel] = x0[j, sel]
    return x


# -- reference semantics ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_argmax_is_torch_argmax_with_ties_to_the_first(dtype):
    from llada_app.generation import _argmax

    g = torch.Generator().manual_seed(0)
    t = torch.randint(-3, 4, (3, 7, 50), generator=g).to(dtype)  # small integers: many equal maxima
    t[0, 0] = -torch.inf
    t[1, 2, 10:] = torch.inf
    got = _argmax(t)
    assert got.dtype == torch.long and torch.equal(got, t.argmax(-1))
    assert got[1, 2] == 10


def test_block_schedule_spreads_the_remainder_over_the_first_steps():
    assert block_schedule(10, 4) == [3, 3, 2, 2]
    assert block_schedule(8, 8) == [1] * 8
    assert block_schedule(3, 8) == [1, 1, 1]  # the reference's 5 empty steps are skipped
    assert sum(block_schedule(37, 5)) == 37


@pytest.mark.parametrize("gen_length,block_length,steps", [(16, 16, 16), (16, 4, 8), (24, 8, 6), (16, 8, 16)])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_reference_loop(sharp_model, prompts, ids, gen_length, block_length, steps, cfg_scale, padded):
    a, b = prompts
    if padded:  # batch of 2 with different prompt lengths, left-padded
        prompt, mask = pad_prompts([a, b], pad_id=ids["eos_id"])
        assert mask is not None
    else:  # one prompt, no padding mask (the reference app crashes on CFG here)
        prompt, mask = pad_prompts([b], pad_id=ids["eos_id"])
        assert mask is None
    cfg = GenerationConfig(gen_length=gen_length, block_length=block_length, steps=steps, cfg_scale=cfg_scale)
    got = generate(TorchDenoiser(sharp_model), prompt, mask, cfg, **ids)
    want = reference_generate(sharp_model, prompt, mask, steps=steps, gen_length=gen_length,
                              block_length=block_length, cfg_scale=cfg_scale, mask_id=ids["mask_id"])
    assert got.shape == (prompt.shape[0], prompt.shape[1] + gen_length)
    assert torch.equal(got, want)
    assert not (got == ids["mask_id"]).any()


def test_left_padding_does_not_change_a_row(sharp_model, prompts, ids):
    """A padded row decodes like the same prompt alone (RoPE is relative, padding keys are masked)."""
    a, b = prompts
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16)
    d = TorchDenoiser(sharp_model)
    batch = generate(d, *pad_prompts([a, b], ids["eos_id"]), cfg, **ids)
    alone = generate(d, torch.tensor([a]), None, cfg, **ids)
    assert torch.equal(batch[0, -16:], alone[0, -16:])


def test_seeded_sampling_is_reproducible(sharp_model, prompts, ids):
    prompt = torch.tensor([prompts[1]])
    d = TorchDenoiser(sharp_model)
    for extra in (dict(temperature=1.0), dict(remasking="random"), dict(temperature=0.7, remasking="random")):
        cfg = GenerationConfig(gen_length=16, block_length=8, steps=8, seed=123, **extra)
        first, second = generate(d, prompt, None, cfg, **ids), generate(d, prompt, None, cfg, **ids)
        other = generate(d, prompt, None, replace(cfg, seed=124), **ids)
        assert torch.equal(first, second), extra
        assert not torch.equal(first, other), extra  # the seed does drive the randomness
        assert not (first == ids["mask_id"]).any()


# -- options ---------------------------------------------------------------------------------------

def test_constraints_are_forced_at_every_step(sharp_model, prompts, ids):
    prompt = torch.tensor([prompts[0]])
    cons = {0: 42, 5: 43, 15: 44}
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=8, constraints=cons)
    P = prompt.shape[1]
    steps = list(sample_steps(TorchDenoiser(sharp_model), prompt, None, cfg, **ids))
    for s in steps:
        for pos, tok in cons.items():
            assert s.ids[0, P + pos] == tok
            assert not s.revealed[0, P + pos]
    # 13 free slots over 2 blocks of 4 steps each: every step reveals at least one
    assert sum(int(s.revealed.sum()) for s in steps) == 16 - len(cons)
    assert not (steps[-1].ids == ids["mask_id"]).any()


def _stop_at(L, G, ids):
    return {L: ids["eot_id"]} | {i: ids["eos_id"] for i in range(L + 1, G)}


def test_length_search_with_one_length_is_generate_with_the_stop_fixed(sharp_model, prompts, ids):
    prompt, mask = pad_prompts(prompts, 0)
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16)
    got = generate_length_search(TorchDenoiser(sharp_model), prompt, mask, cfg, [5], **ids)
    want = generate(TorchDenoiser(sharp_model), prompt, mask, replace(cfg, constraints=_stop_at(5, 16, ids)), **ids)
    assert torch.equal(got, want)


@pytest.mark.parametrize("block_length,steps,extra", [
    (16, 16, {}), (4, 8, {}), (4, 16, dict(cache="dual")), (8, 8, dict(cache="prefix", cfg_scale=1.0)),
])
def test_length_search_keeps_each_rows_most_confident_candidate(sharp_model, prompts, ids, block_length, steps,
                                                                 extra):
    prompt, mask = pad_prompts(prompts, 0)  # two rows, left-padded: each row chooses on its own
    P, lengths = prompt.shape[1], [3, 6, 9, 12]
    cfg = GenerationConfig(gen_length=16, block_length=block_length, steps=steps, **extra)
    counting = Counting(TorchDenoiser(sharp_model))
    stream = list(length_search_steps(counting, prompt, mask, cfg, lengths[::-1], **ids))  # any order
    runs = []  # per candidate, decoded on its own: [(ids, [(sum of log-confidences, count) per row]) per step]
    for L in lengths:
        running, total = [], [[0.0, 0], [0.0, 0]]
        for s in sample_steps(TorchDenoiser(sharp_model), prompt, mask,
                              replace(cfg, constraints=_stop_at(L, 16, ids)), **ids):
            for row in (0, 1):
                total[row][0] += sum(float(c.log()) for c in s.confidence[row][s.revealed[row]])
                total[row][1] += int(s.revealed[row].sum())
            running.append((s.ids, [tuple(t) for t in total], s.revealed, s.confidence, s.canvas))
        assert [n for _, n in running[-1][1]] == [L, L]  # every free slot revealed once
        runs.append(running)

    def leader(i, row):  # the candidate with the best mean log-confidence after step i (ties: the shorter)
        means = [run[min(i, len(run)) - 1][1][row] for run in runs]
        return max(range(len(lengths)), key=lambda k: (means[k][0] / max(means[k][1], 1), -k))

    # The candidates run side by side: as many steps and forward passes as the longest one alone, and a
    # candidate's rows leave the batch when it is done (no more rows forwarded than the runs alone).
    n = max(len(run) for run in runs)
    assert len(stream) == n + 1 and all(s.done is False for s in stream[:-1]) and stream[-1].done is True
    assert [s.step for s in stream[:-1]] == list(range(1, n + 1)) == [s.nfe for s in stream[:-1]]
    assert counting.rows == 2 * sum(len(run) for run in runs) * (2 if cfg.cfg_scale else 1)
    for i, s in enumerate(stream, start=1):  # each step shows each row's leader; the last one the kept answers
        for row in (0, 1):
            k = leader(min(i, n), row)
            step_ids, _, revealed, confidence, canvas = runs[k][min(i, len(runs[k])) - 1]
            assert torch.equal(s.ids[row], step_ids[row]) and torch.equal(s.canvas[row], canvas[row])
            if i <= len(runs[k]) and not s.done:  # what the leader revealed at this step, as it did alone
                assert torch.equal(s.revealed[row], revealed[row])
                torch.testing.assert_close(s.confidence[row], confidence[row])
    final = stream[-1]
    assert (final.step, final.nfe, final.prompt_length) == (n, n, P)
    assert final.revealed.dtype == torch.bool and not final.revealed.any() and not final.confidence.any()
    assert final.revealed.shape == final.confidence.shape == final.ids.shape
    for row in (0, 1):
        L = lengths[leader(n, row)]
        assert final.ids[row, P + L] == ids["eot_id"] and (final.ids[row, P + L + 1:] == ids["eos_id"]).all()
    assert len({lengths[leader(n, row)] for row in (0, 1)} | {lengths[leader(1, 0)]}) > 1  # the choice matters
    assert torch.equal(final.ids, generate_length_search(TorchDenoiser(sharp_model), prompt, mask, cfg, lengths, **ids))


@pytest.mark.parametrize("lengths,extra,match", [
    ([], {}, "at least one"), ([0, 4], {}, "in \\[1, gen length - 1 = 15\\]"), ([16], {}, "in \\[1, gen length"),
    ([4], dict(remasking="random"), "low_confidence"), ([4, 8], dict(constraints={5: 42}), "before the shortest"),
])
def test_length_search_errors(sharp_model, prompts, ids, lengths, extra, match):
    cfg = GenerationConfig(gen_length=16, block_length=16, steps=16, **extra)
    with pytest.raises(ValueError, match=match):
        generate_length_search(TorchDenoiser(sharp_model), torch.tensor([prompts[0]]), None, cfg, lengths, **ids)


def test_length_search_accepts_the_shortest_and_longest_lengths(sharp_model, prompts, ids):
    """Lengths 1 and gen length - 1 (room for the stop token) are valid; a constraint just before the
    shortest candidate's stop slot is kept, one on that slot is refused."""
    cfg = GenerationConfig(gen_length=16, block_length=16, steps=16)
    prompt, P = torch.tensor([prompts[0]]), len(prompts[0])
    out = generate_length_search(TorchDenoiser(sharp_model), prompt, None, cfg, [1, 15], **ids)
    assert out.shape == (1, P + 16)
    out = generate_length_search(TorchDenoiser(sharp_model), prompt, None, replace(cfg, constraints={2: 42}), [3, 8], **ids)
    assert int(out[0, P + 2]) == 42
    with pytest.raises(ValueError, match=r"before the shortest candidate \(3\)"):
        generate_length_search(TorchDenoiser(sharp_model), prompt, None, replace(cfg, constraints={3: 42}), [3, 8], **ids)


def test_suppress_eos_and_zero_confidence(sharp_model, prompts, ids):
    prompt = torch.tensor([prompts[1]])
    eos, eot = ids["eos_id"], ids["eot_id"]
    # Bias the model towards EOS/EoT so that they are proposed everywhere.
    d = Counting(TorchDenoiser(sharp_model), bias={eos: 8.0, eot: 7.0})
    base = GenerationConfig(gen_length=16, block_length=8, steps=16)

    plain = list(sample_steps(d, prompt, None, base, **ids))
    assert (plain[-1].ids[0, -16:] == eos).any()
    assert any(float(s.confidence[s.revealed & ((s.ids == eos) | (s.ids == eot))].max()) > 0 for s in plain)

    suppressed = generate(d, prompt, None, replace(base, suppress_eos=True), **ids)
    assert not (suppressed[0, -16:] == eos).any()

    zero = list(sample_steps(d, prompt, None, replace(base, eos_zero_confidence=True), **ids))
    assert torch.equal(generate(d, prompt, None, replace(base, eos_zero_confidence=True), **ids), zero[-1].ids)
    stops = [(s.revealed & ((s.ids == eos) | (s.ids == eot))) for s in zero]
    assert any(m.any() for m in stops)
    for s, m in zip(zero, stops):
        assert (s.confidence[m] == 0).all()


def test_threshold_one_reveals_one_token_per_step(sharp_model, prompts, ids):
    prompt = torch.tensor([prompts[0]])
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, threshold=1.0)
    steps = list(sample_steps(TorchDenoiser(sharp_model), prompt, None, cfg, **ids))
    assert len(steps) == steps[-1].nfe == 16
    assert all(int(s.revealed.sum()) == 1 for s in steps)
    # ... and then it is the reference schedule with one token per step
    want = reference_generate(sharp_model, prompt, None, steps=16, gen_length=16, block_length=8,
                              mask_id=ids["mask_id"])
    assert torch.equal(steps[-1].ids, want)


def test_tiny_threshold_reveals_a_block_per_step(sharp_model, prompts, ids):
    prompt, mask = pad_prompts(list(prompts), ids["eos_id"])
    cfg = GenerationConfig(gen_length=24, block_length=8, steps=24, threshold=1e-9)
    steps = list(sample_steps(TorchDenoiser(sharp_model), prompt, mask, cfg, **ids))
    assert len(steps) == 3 and steps[-1].done
    assert all(int(s.revealed.sum()) == 2 * 8 for s in steps)


def test_factor_variant_reveals_at_least_one_and_terminates(sharp_model, prompts, ids):
    prompt, mask = pad_prompts(list(prompts), ids["eos_id"])
    for f in (0.1, 1.0, 4.0):
        cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, factor=f)
        steps = list(sample_steps(TorchDenoiser(sharp_model), prompt, mask, cfg, **ids))
        assert all((s.revealed.sum(1) >= 1).all() for s in steps[:-1])
        assert not (steps[-1].ids == ids["mask_id"]).any()
        # f = 4: 1 - 4/(n+1) <= 0 for n <= 3, so at least 3 tokens in each step that has them
        if f == 4.0:
            assert len(steps) <= 2 * 3


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_forward_gives_the_full_forward_block_logits(sharp_model, prompts, ids, cache):
    """Same input, cache filled by a full pass: block logits agree within 1e-4 absolute (fp32)."""
    d = TorchDenoiser(sharp_model)
    prompt, mask = pad_prompts(list(prompts), ids["eos_id"])
    B, P = prompt.shape
    x = torch.full((B, P + 24), ids["mask_id"])
    x[:, :P] = prompt
    x[:, P:P + 11] = torch.randint(0, 300, (B, 11))  # a first block done, the second half done
    attn = torch.cat([mask, torch.ones(B, 24, dtype=mask.dtype)], 1)
    bs, be = P + 8, P + 16
    full = d(x, attn, use_cache=True)
    past = full.past_key_values
    if cache == "prefix":
        past = tuple((k[:, :, :bs], v[:, :, :bs]) for k, v in past)
        part = d(x[:, bs:], attn, past_key_values=past, start=bs, logits_slice=slice(0, be - bs)).logits
    else:
        part = d(x[:, bs:be], attn, past_key_values=past, start=bs).logits
    torch.testing.assert_close(part, full.logits[:, bs:be], atol=1e-4, rtol=0)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_cached_decoding_equals_vanilla_when_the_cache_is_exact(one_layer_model, prompts, ids, cache, cfg_scale):
    prompt, mask = pad_prompts(list(prompts), ids["eos_id"])
    cfg = GenerationConfig(gen_length=24, block_length=8, steps=24, cfg_scale=cfg_scale)
    d = Counting(TorchDenoiser(one_layer_model))
    want = reference_generate(one_layer_model, prompt, mask, steps=24, gen_length=24, block_length=8,
                              cfg_scale=cfg_scale, mask_id=ids["mask_id"])
    got = generate(d, prompt, mask, replace(cfg, cache=cache), **ids)
    assert torch.equal(got, want)
    assert d.calls == 24 and all(d.with_mask)  # the padding mask goes with every call, the prefill's too
    P = prompt.shape[1]  # per block: one full pass, then the block and what follows (prefix) or the block (dual)
    assert d.widths == [w for b in range(3) for w in [P + 24] + [24 - 8 * b if cache == "prefix" else 8] * 7]


@pytest.mark.parametrize("extra", [
    dict(), dict(cache="prefix"), dict(cache="dual"), dict(threshold=0.9), dict(threshold=0.5, cache="dual"),
    dict(factor=1.0, cache="prefix"), dict(remasking="random", seed=0, cache="dual"), dict(temperature=1.0, seed=0),
    dict(cfg_scale=1.0, cache="dual", threshold=0.7), dict(constraints={3: 5}, cache="prefix", threshold=0.7),
])
def test_every_mode_terminates_with_no_mask_left(sharp_model, prompts, ids, extra):
    prompt, mask = pad_prompts(list(prompts), ids["eos_id"])
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=8, **extra)
    steps = list(sample_steps(TorchDenoiser(sharp_model), prompt, mask, cfg, **ids))
    assert steps[-1].done and not any(s.done for s in steps[:-1])
    assert not (steps[-1].ids == ids["mask_id"]).any()
    assert [s.step for s in steps] == list(range(1, len(steps) + 1))


# -- the stream ------------------------------------------------------------------------------------

def test_stream_reveals_masks_step_by_step(sharp_model, prompts, ids):
    prompt, mask = pad_prompts(list(prompts), ids["eos_id"])
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=8)
    P = prompt.shape[1]
    prev = torch.cat([prompt, torch.full((2, 16), ids["mask_id"])], 1)
    n_prev = int((prev == ids["mask_id"]).sum())
    for s in sample_steps(TorchDenoiser(sharp_model), prompt, mask, cfg, **ids):
        n = int((s.ids == ids["mask_id"]).sum())
        assert n < n_prev
        assert s.prompt_length == P and s.nfe == s.step
        assert (prev[s.revealed] == ids["mask_id"]).all() and (s.ids[s.revealed] != ids["mask_id"]).all()
        assert torch.equal(s.ids[~s.revealed], prev[~s.revealed])  # revealed tokens are never re-masked
        assert (s.confidence[s.revealed] > 0).all() and (s.confidence[~s.revealed] == 0).all()
        prev, n_prev = s.ids, n
    assert n_prev == 0


def test_closing_the_stream_stops_the_work(sharp_model, prompts, ids):
    d = Counting(TorchDenoiser(sharp_model))
    stream = sample_steps(d, torch.tensor([prompts[0]]), None, GenerationConfig(gen_length=16, block_length=8, steps=16), **ids)
    first, second = next(stream), next(stream)
    assert (first.step, second.step, d.calls) == (1, 2, 2)
    stream.close()  # the Stop button
    with pytest.raises(StopIteration):
        next(stream)
    assert d.calls == 2


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(gen_length=30, block_length=8), "not divisible by block length"),
    (dict(gen_length=32, block_length=8, steps=6), "not divisible by the number of blocks"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(gen_length=256, block_length=32, steps=256), "exceeds the model's context"),
    (dict(cache="dual"), "needs a back end with a K/V cache"),
    (dict(cache="full"), "cache must be one of"),
    (dict(remasking="top"), "remasking must be one of"),
    (dict(threshold=0.9, factor=1.0), "give one, not both"),
    (dict(threshold=1.5), "threshold must be in"),
    (dict(threshold=0.9, remasking="random"), "needs remasking='low_confidence'"),
    (dict(temperature=-1.0), "temperature"),
    (dict(constraints={40: 3}, gen_length=32), "outside the answer"),
])
def test_invalid_combinations_raise(sharp_model, prompts, ids, kw, match):
    d = Counting(TorchDenoiser(sharp_model), supports_cache=False)
    cfg = GenerationConfig(**{**dict(gen_length=32, block_length=8, steps=32), **kw})
    with pytest.raises(ValueError, match=match):
        generate(d, torch.tensor([prompts[1]]), None, cfg, **ids)
    assert d.calls == 0  # raised before any work, also from the stream's first next()


def test_stream_validates_on_creation(sharp_model, prompts, ids):
    with pytest.raises(ValueError, match="steps must be"):
        sample_steps(TorchDenoiser(sharp_model), torch.tensor([prompts[0]]), None, GenerationConfig(steps=0), **ids)


def test_pad_prompts():
    x, m = pad_prompts([[5, 6, 7], [8]], pad_id=1)
    assert x.tolist() == [[5, 6, 7], [1, 1, 8]] and m.tolist() == [[1, 1, 1], [0, 0, 1]]
    x, m = pad_prompts([[5, 6], [7, 8]], pad_id=1)
    assert m is None
    with pytest.raises(ValueError):
        pad_prompts([[1], []], pad_id=1)


# -- the autoregressive baseline -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def causal_model(tiny_tokenizer):
    torch.manual_seed(3)
    return LLaDAModelLM(tiny_config(tiny_tokenizer, causal=True, init_std=0.3)).eval()


@torch.no_grad()
def greedy_reference(model, prompt, n):
    x = prompt.clone()
    for _ in range(n):
        x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x


def test_arm_greedy_with_cache_equals_full_recompute(causal_model, prompts, ids):
    d = Counting(TorchDenoiser(causal_model))
    prompt = torch.tensor([prompts[1]])
    unused = 10 ** 6  # a stop id that never occurs: run all 12 steps
    got = generate_arm(d, prompt, max_new_tokens=12, stop_ids=[unused])
    assert torch.equal(got, greedy_reference(causal_model, prompt, 12))
    assert d.widths == [prompt.shape[1]] + [1] * 11  # prefill, then one new token per step from the cache
    plain = Counting(TorchDenoiser(causal_model), supports_cache=False)
    no_cache = generate_arm(plain, prompt, max_new_tokens=12, stop_ids=[unused])
    assert torch.equal(no_cache, got)
    assert plain.widths == list(range(prompt.shape[1], prompt.shape[1] + 12))  # the whole sequence every step


def test_arm_padded_batch_and_stop(causal_model, prompts, ids):
    d = TorchDenoiser(causal_model)
    a, b = prompts
    prompt, mask = pad_prompts([a, b], ids["eos_id"])
    alone = generate_arm(d, torch.tensor([a]), max_new_tokens=8, stop_ids=[10 ** 6])
    batch = generate_arm(d, prompt, mask, max_new_tokens=8, stop_ids=[10 ** 6])
    assert torch.equal(batch[0, -8:], alone[0, -8:])
    # Use the 3rd generated token of row 0 as a stop id: row 0 stops there and is filled after it.
    stop = int(alone[0, len(a) + 2])
    steps = list(arm_steps(d, torch.tensor([a]), max_new_tokens=8, stop_ids=[stop]))
    first_stop = next(i for i in range(8) if int(alone[0, len(a) + i]) == stop)
    assert len(steps) == first_stop + 1 and steps[-1].done
    assert all(int(s.revealed.sum()) == 1 for s in steps)


def test_arm_steps_describe_each_new_token(causal_model, prompts):
    """Each step: the ids so far, the new column revealed with its greedy probability as confidence,
    step = nfe = tokens so far, the prompt length, and done on the last of max_new_tokens."""
    prompt = torch.tensor([prompts[1]])
    P = prompt.shape[1]
    steps = list(arm_steps(TorchDenoiser(causal_model), prompt, max_new_tokens=5, stop_ids=[10 ** 6]))
    assert [(s.step, s.nfe, s.prompt_length, s.done) for s in steps] == [(i, i, P, i == 5) for i in range(1, 6)]
    for s in steps:
        T = s.ids.shape[1]
        assert s.revealed.dtype == torch.bool and s.revealed.shape == (1, T) and s.revealed[0].tolist() == [False] * (T - 1) + [True]
        with torch.no_grad():
            probs = torch.softmax(causal_model(s.ids[:, :-1]).logits[0, -1], -1)
        assert s.confidence.shape == (1, T) and float(s.confidence[0, :-1].abs().sum()) == 0.0
        assert float(s.confidence[0, -1]) == pytest.approx(float(probs.max()), abs=1e-5)
        assert int(s.ids[0, -1]) == int(probs.argmax())


def test_threshold_one_reveals_every_certain_token_at_once(sharp_model, prompts, ids):
    """tau = 1: a confidence of exactly 1 passes (>=): with one token made certain everywhere, each block
    is decoded in one step."""
    tok = 7
    d = Counting(TorchDenoiser(sharp_model), bias={tok: 1e4})
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, threshold=1.0)
    steps = list(sample_steps(d, torch.tensor([prompts[0]]), None, cfg, **ids))
    assert len(steps) == 2 and (steps[-1].ids[0, -16:] == tok).all()


def test_length_search_without_eot_stops_with_eos(sharp_model, prompts, ids):
    cfg = GenerationConfig(gen_length=16, block_length=16, steps=16)
    P = len(prompts[0])
    out = generate_length_search(TorchDenoiser(sharp_model), torch.tensor([prompts[0]]), None, cfg, [5],
                                 mask_id=ids["mask_id"], eos_id=ids["eos_id"], eot_id=None)
    assert (out[0, P + 5:] == ids["eos_id"]).all()


@pytest.mark.parametrize("extra", [dict(threshold=0.6), dict(factor=1.0)])
def test_parallel_decoding_counts_each_row_on_its_own(sharp_model, prompts, ids, extra):
    """Threshold / factor decoding of a padded two-row batch: each row reveals by its own confidences,
    as if it were alone."""
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, **extra)
    prompt, mask = pad_prompts(list(prompts), ids["eos_id"])
    both = generate(TorchDenoiser(sharp_model), prompt, mask, cfg, **ids)
    for row, p in enumerate(prompts):
        alone = generate(TorchDenoiser(sharp_model), torch.tensor([p]), None, cfg, **ids)
        assert both[row, -16:].tolist() == alone[0, -16:].tolist()


def test_steps_name_their_block(sharp_model, prompts, ids):
    steps = list(sample_steps(TorchDenoiser(sharp_model), torch.tensor([prompts[0]]), None,
                              GenerationConfig(gen_length=16, block_length=8, steps=4), **ids))
    assert [s.block for s in steps] == [0, 0, 1, 1]


def test_search_ranks_candidates_by_mean_log_confidence():
    """Two candidates of one prompt: one token at 0.497 (log -0.7) against two at 0.607 (log -0.5 each):
    the mean keeps the second (a sum, or dividing a single token's log by 2, would keep the first)."""
    x = torch.full((2, 4), 9)  # [K * B, L], K = 2, B = 1; 9 plays the mask
    revealed = torch.tensor([[False, True, False, False], [False, True, True, False]])
    confidence = torch.tensor([[0.0, math.exp(-0.7), 0, 0], [0.0, math.exp(-0.5), math.exp(-0.5), 0]])
    ids = torch.tensor([[1, 2, 9, 9], [1, 3, 4, 9]])

    def stream():
        yield Step(ids=ids, prompt_length=1, revealed=revealed, confidence=confidence, step=1, nfe=1, done=True)

    steps = list(_search(stream(), x, 1, 2))
    assert [s.done for s in steps] == [False, True]
    assert steps[-1].ids.tolist() == [[1, 3, 4, 9]] and (steps[-1].step, steps[-1].nfe) == (1, 1)


def test_search_adds_the_rescore_to_the_final_choice_only():
    """The same two candidates: a rescore of +1 for the first makes it the kept one, while the lead shown
    during the stream stays the confidence's."""
    x = torch.full((2, 4), 9)
    revealed = torch.tensor([[False, True, False, False], [False, True, True, False]])
    confidence = torch.tensor([[0.0, math.exp(-0.7), 0, 0], [0.0, math.exp(-0.5), math.exp(-0.5), 0]])
    ids = torch.tensor([[1, 2, 9, 9], [1, 3, 4, 9]])
    seen = []

    def stream():
        yield Step(ids=ids, prompt_length=1, revealed=revealed, confidence=confidence, step=1, nfe=1, done=True)

    def rescore(final, rows):
        seen.append((final.tolist(), rows.tolist()))
        return torch.tensor([1.0, 0.0])

    steps = list(_search(stream(), x, 1, 2, rescore))
    assert steps[0].ids.tolist() == [[1, 3, 4, 9]] and steps[-1].ids.tolist() == [[1, 2, 9, 9]]
    assert seen == [(ids.tolist(), [0, 1])]  # called once, on every candidate's final ids


def test_search_rescores_only_the_most_confident_candidates_of_each_prompt():
    """K = 3 candidates of B = 2 prompts (row k * B + b): with rescore_top 2, each prompt's least confident
    candidate is never re-scored and cannot be kept, however high the score it would have got."""
    K, B = 3, 2
    x = torch.full((K * B, 3), 9)
    conf = torch.tensor([0.9, 0.2, 0.5, 0.6, 0.8, 0.4])  # prompt 0: rows 0, 2, 4; prompt 1: rows 1, 3, 5
    ids = torch.arange(K * B)[:, None].repeat(1, 3)  # row r holds token r

    def stream():
        yield Step(ids=ids, prompt_length=1, revealed=torch.ones(K * B, 3, dtype=torch.bool),
                   confidence=conf[:, None].repeat(1, 3), step=1, nfe=1, done=True)

    calls = []

    def rescore(final, rows):  # a big bonus for the least confident row of each prompt, 2 and 1
        calls.append(rows.tolist())
        assert torch.equal(final, ids[rows])
        return torch.where((rows == 2) | (rows == 1), 100.0, 0.0)

    kept = list(_search(stream(), x, 1, K, rescore, rescore_top=2))[-1].ids[:, 0].tolist()
    assert calls == [[0, 3, 4, 5]] and kept == [0, 3]  # the confidence's own choice: 2 and 1 never ran
    calls.clear()
    kept = list(_search(stream(), x, 1, K, rescore, rescore_top=0))[-1].ids[:, 0].tolist()
    assert calls == [[0, 1, 2, 3, 4, 5]] and kept == [2, 1]  # 0: every candidate

    def rule_out(final, rows):  # prompt 0: only its most confident pick ruled out; prompt 1: every pick
        return torch.where((rows == 0) | (rows % B == 1), -torch.inf, 0.0)

    kept = list(_search(stream(), x, 1, K, rule_out, rescore_top=2))[-1].ids[:, 0].tolist()
    assert kept == [4, 3]  # prompt 1 falls back to its most confident pick (not row 1, its first candidate)


def test_a_search_with_nothing_to_fill_returns_its_canvas(sharp_model, prompts, ids):
    P = len(prompts[0])
    canvas = torch.tensor([prompts[0] + [5] * 8, prompts[0] + [6] * 8])  # K = 2 candidates, no MASK slot
    steps = list(candidate_steps(TorchDenoiser(sharp_model), canvas, None, 2,
                                 GenerationConfig(gen_length=8, block_length=8, steps=8), prompt_length=P, **ids))
    assert len(steps) == 1 and (steps[0].step, steps[0].nfe, steps[0].done) == (0, 0, True)
    assert steps[0].ids.tolist() == canvas[:1].tolist()


def test_requests_are_checked_before_decoding(sharp_model, prompts, ids):
    d = TorchDenoiser(sharp_model)
    cfg = GenerationConfig(gen_length=8, block_length=8, steps=8)
    prompt = torch.tensor([prompts[0]])
    wrong_mask = torch.ones(1, len(prompts[0]) + 1, dtype=torch.long)
    forced_mask = replace(cfg, constraints={0: ids["mask_id"]})
    for run in (lambda c, m: next(sample_steps(d, prompt, m, c, **ids)),
                lambda c, m: next(length_search_steps(d, prompt, m, c, [3], **ids))):
        with pytest.raises(ValueError, match="attention_mask shape"):
            run(cfg, wrong_mask)
        with pytest.raises(ValueError, match="cannot force the mask token"):
            run(forced_mask, None)
    with pytest.raises(ValueError, match="needs a back end with a K/V cache"):
        next(length_search_steps(Counting(d, supports_cache=False), prompt, None, replace(cfg, cache="dual"), [3], **ids))
    with pytest.raises(ValueError, match="must be a finite number"):
        replace(cfg, temperature=float("nan")).validate(64, 4)
    with pytest.raises(ValueError, match=r"non-empty \[batch, length\]"):
        next(arm_steps(TorchDenoiser(sharp_model), torch.tensor(prompts[0]), max_new_tokens=2, stop_ids=[1]))


def test_arm_limits_are_inclusive(causal_model):
    d = TorchDenoiser(causal_model)
    assert generate_arm(d, torch.tensor([[5]]), max_new_tokens=1, stop_ids=[10 ** 6]).shape == (1, 2)
    fill = torch.full((1, d.max_length - 2), 5)
    assert generate_arm(d, fill, max_new_tokens=2, stop_ids=[10 ** 6]).shape == (1, d.max_length)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate_arm(d, fill, max_new_tokens=3, stop_ids=[10 ** 6])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate_arm(d, fill, max_new_tokens=0, stop_ids=[10 ** 6])


@pytest.mark.parametrize("kw", [dict(gen_length=1, block_length=1, steps=1), dict(gen_length=8, block_length=8, steps=1),
                                dict(threshold=1.0), dict(factor=1e-3), dict(cache="dual"),
                                dict(gen_length=8, block_length=8, steps=8, constraints={0: 0, 7: 5})])
def test_configs_at_the_limits_are_accepted(kw):
    """The edges of every range are valid (a prompt of one token, prompt + answer = the context, ...)."""
    cfg = GenerationConfig(**dict(dict(gen_length=8, block_length=8, steps=8), **kw))
    cfg.validate(max_length=cfg.gen_length + 1, prompt_length=1)  # back end with a cache by default
    cfg.validate(max_length=cfg.gen_length + 4, prompt_length=4)


@pytest.mark.parametrize("kw,match", [
    (dict(threshold=0.0), r"threshold must be in \(0, 1\]"), (dict(factor=0.0), "factor must be > 0"),
    (dict(gen_length=0), "must be >= 1"), (dict(block_length=0), "must be >= 1"), (dict(steps=0), "steps must be >= 1"),
    (dict(constraints={8: 5}), r"position 8 is outside the answer \(0..7\)"),
    (dict(constraints={0: -1}), "negative"), (dict(threshold=0.5, factor=0.5), "give one, not both"),
])
def test_configs_past_the_limits_are_refused(kw, match):
    cfg = GenerationConfig(**dict(dict(gen_length=8, block_length=8, steps=8), **kw))
    with pytest.raises(ValueError, match=match):
        cfg.validate(max_length=64, prompt_length=4)
    with pytest.raises(ValueError, match="the prompt is empty"):
        GenerationConfig(gen_length=8, block_length=8, steps=8).validate(max_length=64, prompt_length=0)
    with pytest.raises(ValueError, match=r"\(5 tokens\) \+ gen length \(8\) = 13 tokens exceeds the model's context of 12"):
        GenerationConfig(gen_length=8, block_length=8, steps=8).validate(max_length=12, prompt_length=5)


def test_arm_refuses_a_diffusion_model(sharp_model, prompts):
    with pytest.raises(ValueError, match="causal"):
        generate_arm(TorchDenoiser(sharp_model), torch.tensor([prompts[0]]), max_new_tokens=4, stop_ids=[1])


def test_parse_constraints(tiny_tokenizer):
    got = parse_constraints("0:fairest, 5: beauty's", tiny_tokenizer)
    first = tiny_tokenizer.encode(" fairest", add_special_tokens=False)
    second = tiny_tokenizer.encode(" beauty's", add_special_tokens=False)
    assert got == {**{i: t for i, t in enumerate(first)}, **{5 + i: t for i, t in enumerate(second)}}
    assert parse_constraints(" ", tiny_tokenizer) == {}
    for bad in ("fairest", "x:fairest", "3:"):
        with pytest.raises(ValueError, match="position:word"):
            parse_constraints(bad, tiny_tokenizer)


# -- the confidence as the references compute it -----------------------------------------------------

@pytest.fixture(scope="module")
def mask_heavy_model(tiny_tokenizer):
    """A model whose LM head ranks the mask token high: p(MASK) is large at every position (as on a
    random-weight checkpoint, where the references and a MASK-free softmax part ways)."""
    torch.manual_seed(4)
    model = LLaDAModelLM(tiny_config(tiny_tokenizer, n_layers=1)).eval()
    head = model.model.transformer.ff_out.weight
    with torch.no_grad():
        h = model.model.transformer.ln_f(model.model.transformer.wte.weight[:50]).mean(0)
        head[tiny_tokenizer.mask_token_id] = 6.0 * h / h.norm() ** 2  # logit ≈ 6 above the rest
    return model


def test_confidence_is_the_softmax_of_the_raw_logits_with_a_heavy_mask_token(mask_heavy_model, prompts, ids):
    mask_id = ids["mask_id"]
    prompt, attn = pad_prompts(list(prompts), ids["eos_id"])
    cfg = GenerationConfig(gen_length=8, block_length=8, steps=8)
    steps = list(sample_steps(TorchDenoiser(mask_heavy_model), prompt, attn, cfg, **ids))
    P, full = prompt.shape[1], torch.cat([attn, torch.ones(2, 8, dtype=attn.dtype)], 1)
    x = torch.cat([prompt, torch.full((2, 8), mask_id)], 1)
    p_mask = []
    for step in steps:
        with torch.no_grad():
            probs = torch.softmax(mask_heavy_model(x, attention_mask=full).logits.float(), -1)  # p(MASK) included
        p_mask.append(probs[:, P:, mask_id].mean().item())
        for b, pos in step.revealed.nonzero().tolist():
            tok = step.ids[b, pos].item()
            assert tok != mask_id  # never proposed
            torch.testing.assert_close(step.confidence[b, pos], probs[b, pos, tok], atol=1e-6, rtol=0)
        x = step.ids
    assert max(p_mask) > 0.3  # the case this test is about
    want = reference_generate(mask_heavy_model, prompt, attn, steps=8, gen_length=8, block_length=8, mask_id=mask_id)
    assert torch.equal(steps[-1].ids, want)


def test_suppress_eos_takes_eos_out_of_the_proposal_and_the_softmax(mask_heavy_model, prompts, ids):
    prompt, attn = pad_prompts(list(prompts), ids["eos_id"])
    cfg = GenerationConfig(gen_length=8, block_length=8, steps=8, suppress_eos=True)
    steps = list(sample_steps(TorchDenoiser(mask_heavy_model), prompt, attn, cfg, **ids))
    x = torch.cat([prompt, torch.full((2, 8), ids["mask_id"])], 1)
    full = torch.cat([attn, torch.ones(2, 8, dtype=attn.dtype)], 1)
    for step in steps:
        with torch.no_grad():
            logits = mask_heavy_model(x, attention_mask=full).logits.float()
        logits[..., ids["eos_id"]] = -torch.inf  # as the official code does before everything
        probs = torch.softmax(logits, -1)
        for b, pos in step.revealed.nonzero().tolist():
            tok = step.ids[b, pos].item()
            assert tok not in (ids["eos_id"], ids["mask_id"])
            torch.testing.assert_close(step.confidence[b, pos], probs[b, pos, tok], atol=1e-6, rtol=0)
        x = step.ids


def test_factor_rule_follows_the_paper_for_the_last_ranked_candidate():
    """Fast-dLLM's factor rule: accept the n-th most confident while c_n >= 1 - f / (n + 1), the first
    always. With f = 1 the thresholds of ranks 1, 2, 3 are 0.5, 0.667, 0.75: [0.99, 0.9, 0.1] reveals
    two. (The reference code also accepts the last-ranked candidate when only it fails; the paper's
    rule, followed here, does not.)"""
    from llada_app.generation import _count_to_reveal

    cfg = GenerationConfig(factor=1.0)
    cand = torch.ones(1, 3, dtype=torch.bool)
    assert _count_to_reveal(torch.tensor([[0.99, 0.9, 0.1]]), cand, cfg, None).item() == 2
    assert _count_to_reveal(torch.tensor([[0.99, 0.9, 0.8]]), cand, cfg, None).item() == 3
    assert _count_to_reveal(torch.tensor([[0.2, 0.1, 0.05]]), cand, cfg, None).item() == 1  # at least one
    # ranks sort by confidence, not position; a failed rank ends the run even if later ones would pass
    assert _count_to_reveal(torch.tensor([[0.1, 0.99, 0.6]]), cand, cfg, None).item() == 1


def test_threshold_mask_is_the_top_k_of_the_candidates_above():
    """The threshold rule without a sort: the same set as the top k of the confidences with k = max(1, the
    candidates >= tau) capped by the candidates, on random rows with ties, rows with no candidate left,
    rows where none is above tau, and tau = 1."""
    from llada_app.generation import _threshold_mask, _top_k_mask

    g = torch.Generator().manual_seed(0)
    for trial in range(3000):
        B, T = 1 + trial % 3, 1 + trial % 33
        cand = torch.rand(B, T, generator=g) < (0.0 if trial % 10 == 0 else 0.6)
        conf = torch.rand(B, T, generator=g)
        if trial % 3 == 0:
            conf = (conf * 4).round() / 4  # ties, and confidences of exactly 0, tau and 1
        conf = torch.where(cand, conf, -torch.inf)
        tau = (0.75, 1.0, 0.999)[trial % 3]
        k = torch.minimum(((conf >= tau) & cand).sum(1).clamp(min=1), cand.sum(1))
        assert torch.equal(_threshold_mask(conf, cand, tau), _top_k_mask(conf, k)), trial
    conf = torch.tensor([[0.2, -torch.inf, 0.4, 0.4], [0.95, 0.1, -torch.inf, 0.91]])
    cand = conf > -torch.inf
    assert _threshold_mask(conf, cand, 0.9).tolist() == [[False, False, True, False], [True, False, False, True]]


@pytest.mark.parametrize("T", [0.5, 2.0])
def test_gumbel_proposals_follow_softmax_of_logits_over_temperature(T):
    """exp(l) / (-log U)^T is the reference's Gumbel-max trick: its argmax is a draw from softmax(l / T).
    Checked by frequencies over 40000 draws (an inverted exponent would give softmax(l * T))."""
    from llada_app.generation import _propose

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).repeat(200, 200, 1)  # [B, T, V]: 40000 positions
    cfg = GenerationConfig(temperature=T)
    gen = torch.Generator().manual_seed(0)
    x0, _ = _propose(logits, cfg, gen, torch.tensor([3]), None, eos_id=1, eot_id=None)  # id 3 is the mask
    freq = torch.bincount(x0.flatten(), minlength=4).float() / x0.numel()
    want = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -torch.inf]) / T, -1)
    torch.testing.assert_close(freq, want, atol=0.01, rtol=0)


def test_arm_fills_a_finished_row_while_another_goes_on(causal_model, prompts, ids):
    """Two rows, one stops early: its later columns hold stop_ids[0]; the other row decodes as if alone."""
    d = TorchDenoiser(causal_model)
    a, b = prompts
    prompt, mask = pad_prompts([a, b], ids["eos_id"])
    free = generate_arm(d, prompt, mask, max_new_tokens=8, stop_ids=[10 ** 6])  # no stop: 8 tokens each
    P = prompt.shape[1]
    stop = int(free[0, P + 1])  # row 0's 2nd token, as a stop id
    assert stop not in free[1, P:].tolist()  # row 1 never produces it: it decodes all 8 tokens
    got = generate_arm(d, prompt, mask, max_new_tokens=8, stop_ids=[stop, 10 ** 6])
    assert got.shape == free.shape
    assert got[0, P:].tolist() == free[0, P:P + 2].tolist() + [stop] * 6  # filled after its stop
    assert torch.equal(got[1], free[1])
