"""Monte Carlo ELBO: exact on one token, converges, and prefers what a model has memorised."""
import pytest
import torch
import torch.nn.functional as F

from llada_app.backends import TorchDenoiser
from llada_app.likelihood import gap_log_likelihood, log_likelihood, mask_counts, score_choices
from llada_app.modeling import LLaDAModelLM

from conftest import tiny_config

PROMPT = "From fairest creatures"
ANSWER = " we desire increase, That thereby beauty's rose might never die"


@pytest.fixture(scope="module")
def pair(tiny_tokenizer):
    return tiny_tokenizer(PROMPT)["input_ids"], tiny_tokenizer(ANSWER)["input_ids"]


@pytest.fixture(scope="module")
def fitted_model(tiny_tokenizer, pair):
    """The tiny model overfitted on one prompt/answer pair for 80 steps with the SFT form of the MDM loss
    (the SFT recipe: answer tokens masked with probability p, loss / p, prompt never masked)."""
    torch.manual_seed(0)
    model = LLaDAModelLM(tiny_config(tiny_tokenizer)).train()
    prompt, answer = pair
    seq = torch.tensor(prompt + answer).repeat(16, 1)  # [16, P + L]
    P, mask_id = len(prompt), tiny_tokenizer.mask_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        p = (1 - 1e-3) * torch.rand(16, 1) + 1e-3
        masked = torch.rand(seq.shape) < p
        masked[:, :P] = False
        logits = model(torch.where(masked, mask_id, seq)).logits
        ce = F.cross_entropy(logits.transpose(1, 2), seq, reduction="none")
        loss = (ce * masked / p).sum() / masked[:, P:].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_mask_counts_are_spread_over_the_answer():
    g = torch.Generator().manual_seed(0)
    n = mask_counts(8, 16, g)
    assert n.min() >= 1 and n.max() <= 16
    assert len(set(n.tolist())) == 8  # evenly spread: 8 different values over 1..16


def test_one_token_answer_is_exact(tiny_model, tiny_tokenizer, pair):
    """With L = 1 every sample masks the single answer token: the estimate is log p exactly."""
    prompt = pair[0]
    tok = pair[1][0]
    mask_id = tiny_tokenizer.mask_token_id
    est = log_likelihood(TorchDenoiser(tiny_model), prompt, [tok], mask_id=mask_id, mc_num=8, batch_size=4, seed=0)
    with torch.no_grad():
        logits = tiny_model(torch.tensor([prompt + [mask_id]])).logits[0, -1]
    assert est == pytest.approx(float(torch.log_softmax(logits, -1)[tok]), abs=1e-5)


def test_estimate_converges(fitted_model, tiny_tokenizer, pair):
    d, mask_id = TorchDenoiser(fitted_model), tiny_tokenizer.mask_token_id
    a = log_likelihood(d, *pair, mask_id=mask_id, mc_num=512, batch_size=64, seed=1)
    b = log_likelihood(d, *pair, mask_id=mask_id, mc_num=512, batch_size=64, seed=2)
    assert a != b  # two different samples ...
    assert a == pytest.approx(b, rel=0.03)  # ... of the same quantity (seeds 1-3 spread ~1%)
    # with CFG too (a different quantity, also stable)
    c = log_likelihood(d, *pair, mask_id=mask_id, mc_num=512, batch_size=64, seed=1, cfg_scale=0.5)
    e = log_likelihood(d, *pair, mask_id=mask_id, mc_num=512, batch_size=64, seed=2, cfg_scale=0.5)
    assert c == pytest.approx(e, rel=0.03)


def test_memorised_answer_ranks_above_shuffled(fitted_model, tiny_tokenizer, pair):
    d, mask_id = TorchDenoiser(fitted_model), tiny_tokenizer.mask_token_id
    prompt, answer = pair
    g = torch.Generator().manual_seed(0)
    shuffled = [answer[i] for i in torch.randperm(len(answer), generator=g).tolist()]
    assert shuffled != answer
    for cfg_scale in (0.0, 1.0):
        good, bad = score_choices(d, prompt, [answer, shuffled], mask_id=mask_id, mc_num=64, batch_size=32,
                                  cfg_scale=cfg_scale)
        assert good > bad + 5.0, (cfg_scale, good, bad)  # nats


@pytest.mark.parametrize("kw,match", [
    (dict(mc_num=100, batch_size=16), "multiple of batch_size"),
    (dict(mc_num=0, batch_size=16), "positive multiple"),
    (dict(cfg_scale=-1.0), "cfg_scale"),
])
def test_bad_arguments_raise(tiny_model, tiny_tokenizer, pair, kw, match):
    with pytest.raises(ValueError, match=match):
        log_likelihood(TorchDenoiser(tiny_model), *pair, mask_id=tiny_tokenizer.mask_token_id, **kw)
    with pytest.raises(ValueError, match="empty"):
        log_likelihood(TorchDenoiser(tiny_model), pair[0], [], mask_id=tiny_tokenizer.mask_token_id)
    with pytest.raises(ValueError, match="context"):
        log_likelihood(TorchDenoiser(tiny_model), pair[0] * 20, pair[1], mask_id=tiny_tokenizer.mask_token_id)


@pytest.fixture(scope="module")
def sharp_model(tiny_tokenizer):
    """Larger random weights than the default init, so the cross-entropy differs from token to token
    and from one mask to another (at std 0.02 every token costs about log V)."""
    torch.manual_seed(1)
    return LLaDAModelLM(tiny_config(tiny_tokenizer, init_std=0.3)).eval()


@pytest.mark.parametrize("L,cfg_scale", [(2, 0.0), (3, 0.0), (3, 0.5)])
def test_estimate_converges_to_the_elbo_computed_by_enumeration(sharp_model, tiny_tokenizer, pair, L, cfg_scale):
    """The exact ELBO of an L-token answer: l uniform in 1..L, then every set of l masked positions equally
    likely, scored sum(CE of the masked) * L / l; with CFG the logits are uncond + (w + 1)(cond - uncond),
    uncond with the prompt masked as well. Enumerated here over all 2^L - 1 masks; the Monte Carlo
    estimate must land on it (a wrong L / l weight moves it by far more than the tolerance)."""
    from itertools import combinations
    from math import comb

    prompt, answer = pair[0], pair[1][:L]
    mask_id, P = tiny_tokenizer.mask_token_id, len(pair[0])
    exact = unweighted = 0.0
    for n in range(1, L + 1):
        for masked in combinations(range(L), n):
            x = torch.tensor([prompt + [mask_id if i in masked else t for i, t in enumerate(answer)]])
            with torch.no_grad():
                logits = sharp_model(x).logits[0, P:]
                if cfg_scale:
                    x[0, :P] = mask_id
                    uncond = sharp_model(x).logits[0, P:]
                    logits = uncond + (cfg_scale + 1) * (logits - uncond)
            logp = torch.log_softmax(logits, -1)
            ce = -sum(float(logp[i, answer[i]]) for i in masked)
            exact += (1 / L) * (1 / comb(L, n)) * ce * L / n
            unweighted += (1 / L) * (1 / comb(L, n)) * ce
    est = log_likelihood(TorchDenoiser(sharp_model), prompt, answer, mask_id=mask_id, mc_num=2048, batch_size=256,
                         seed=1, cfg_scale=cfg_scale)
    assert est == pytest.approx(-exact, rel=0.02), (est, -exact)
    assert abs(exact - unweighted) > 0.1 * exact  # with weight 1 instead of L / l it would land elsewhere


def test_mask_counts_are_stratified_and_uniform():
    """A batch of L samples masks 1, 2, ..., L tokens, once each, from a random offset: over many
    batches the first sample's count is uniform on 1..L."""
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        assert sorted(mask_counts(8, 8, g).tolist()) == list(range(1, 9))
    g = torch.Generator().manual_seed(0)
    firsts = torch.tensor([int(mask_counts(4, 4, g)[0]) for _ in range(2000)])
    freq = torch.bincount(firsts, minlength=5)[1:].float() / len(firsts)
    torch.testing.assert_close(freq, torch.full((4,), 0.25), atol=0.04, rtol=0)
    a, b = (mask_counts(8, 64, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b)  # the generator decides the offset


def test_seed_decides_the_estimate_and_limits_are_inclusive(tiny_model, tiny_tokenizer, pair):
    d, mask_id = TorchDenoiser(tiny_model), tiny_tokenizer.mask_token_id
    prompt, answer = pair
    a, b = (log_likelihood(d, prompt, answer, mask_id=mask_id, mc_num=8, batch_size=4, seed=5) for _ in range(2))
    assert a == b != log_likelihood(d, prompt, answer, mask_id=mask_id, mc_num=8, batch_size=4, seed=6)
    log_likelihood(d, prompt, answer, mask_id=mask_id, mc_num=1, batch_size=1, seed=0)  # one sample is allowed
    fills = [prompt[0]] * (d.max_length - len(answer))
    log_likelihood(d, fills, answer, mask_id=mask_id, mc_num=1, batch_size=1)  # exactly the context
    for bad_prompt, bad_answer in (([mask_id] + prompt, answer), (prompt, answer + [mask_id])):
        with pytest.raises(ValueError, match="mask token"):
            log_likelihood(d, bad_prompt, bad_answer, mask_id=mask_id, mc_num=1, batch_size=1)


def test_score_choices_scores_each_choice_with_the_same_draws(tiny_model, tiny_tokenizer, pair):
    """Defaults: 128 samples in batches of 16, no guidance, seed 0 for every choice."""
    d, mask_id = TorchDenoiser(tiny_model), tiny_tokenizer.mask_token_id
    prompt, answer = pair
    choices = [answer, answer[::-1]]
    want = [log_likelihood(d, prompt, c, mask_id=mask_id, mc_num=128, batch_size=16, cfg_scale=0.0, seed=0)
            for c in choices]
    assert score_choices(d, prompt, choices, mask_id=mask_id) == want
    got = score_choices(d, prompt, choices, mask_id=mask_id, mc_num=8, batch_size=4, cfg_scale=0.5, seed=3)
    assert got == [log_likelihood(d, prompt, c, mask_id=mask_id, mc_num=8, batch_size=4, cfg_scale=0.5, seed=3)
                   for c in choices]


def test_gap_likelihood_of_one_slot_is_exact_in_any_row_of_a_batch(tiny_model, tiny_tokenizer, pair):
    """One slot per row (anywhere, padding after it): every sample masks it, so each row's estimate is
    log p(token | the rest of its row) exactly, whatever the other rows of the batch."""
    mask_id = tiny_tokenizer.mask_token_id
    seq = pair[0] + pair[1]
    rows = torch.tensor([seq, seq, seq[::-1]])  # [3, W]
    slots = torch.zeros_like(rows, dtype=torch.bool)
    slots[0, 2], slots[1, 7], slots[2, 4] = True, True, True
    attn = torch.ones_like(rows)
    attn[1, 10:] = 0  # row 1 ends early: its padding is never attended
    est = gap_log_likelihood(TorchDenoiser(tiny_model), rows, slots, attn, mask_id=mask_id, mc_num=4, batch_size=5,
                             seed=0)
    for r in range(3):
        x = torch.where(slots[r], mask_id, rows[r])[None]
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(x, attention_mask=attn[r:r + 1]).logits[0], -1)
        p = int(slots[r].nonzero())
        assert float(est[r]) == pytest.approx(float(logp[p, rows[r, p]]), abs=1e-5)
    with pytest.raises(ValueError, match="at least one slot"):
        gap_log_likelihood(TorchDenoiser(tiny_model), rows, torch.zeros_like(slots), mask_id=mask_id)
    with pytest.raises(ValueError, match="must not contain the mask token"):
        gap_log_likelihood(TorchDenoiser(tiny_model), torch.where(slots, mask_id, rows), slots, mask_id=mask_id)


def test_gap_likelihood_of_a_row_does_not_depend_on_its_batch(tiny_model, tiny_tokenizer, pair):
    """With a seed every row draws its own masks: a row scored alone or beside others (another width, other
    slot counts) gets the same estimate, so an answer's score does not depend on who shares its batch."""
    mask_id, d = tiny_tokenizer.mask_token_id, TorchDenoiser(tiny_model)
    seq = pair[0] + pair[1]
    rows = torch.tensor([seq, seq[::-1], seq])
    slots = torch.zeros_like(rows, dtype=torch.bool)
    slots[0, 3:9], slots[1, 1:4], slots[2, 10:20] = True, True, True
    together = gap_log_likelihood(d, rows, slots, mask_id=mask_id, mc_num=16, batch_size=7, seed=3)
    for r in range(3):
        alone = gap_log_likelihood(d, rows[r:r + 1], slots[r:r + 1], mask_id=mask_id, mc_num=16, seed=3)
        assert float(alone[0]) == pytest.approx(float(together[r]), abs=1e-4)
    assert len(set(together.tolist())) == 3
