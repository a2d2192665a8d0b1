"""Monte Carlo estimate of log p(answer | prompt) for a masked-diffusion model.

The ELBO of an answer of L tokens: draw l in [1, L], mask l answer tokens uniformly at random (the
prompt never), and score  sum of cross-entropies on the masked tokens * L / l.  Its expectation is
an upper bound on -log p(answer | prompt), so minus the average is a lower bound on the
log-likelihood. The l of one answer's samples are spread evenly over [1, L] from a random offset
(stratified, as in the LLaDA evaluation code), which lowers the variance. Used to score
multiple-choice style questions (the answer with the highest estimate wins) and, batched over
canvases whose "answer" is a gap inside a text, the candidates of the completion protocol.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .backends import Denoiser


def _as_ids(ids: Sequence[int] | torch.Tensor, what: str) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long).flatten()
    if t.numel() == 0:
        raise ValueError(f"the {what} is empty")
    return t


def mask_counts(batch_size: int, L: int, gen: torch.Generator | None) -> torch.Tensor:
    """Stratified numbers of masked answer tokens for one batch -> [batch] long, each in [1, L]."""
    k = torch.randint(1, L + 1, (), generator=gen)
    spread = torch.round(torch.linspace(float(k), float(k) + (batch_size - 1) * L / batch_size, batch_size)).long()
    return (spread - 1) % L + 1


def log_likelihood(denoiser: Denoiser, prompt_ids: Sequence[int] | torch.Tensor,
                   answer_ids: Sequence[int] | torch.Tensor, *, mask_id: int, mc_num: int = 128,
                   batch_size: int = 16, cfg_scale: float = 0.0, seed: int | None = None) -> float:
    """Estimate log p(answer | prompt) (a lower bound, in nats) from mc_num masked samples.

    cfg_scale > 0 scores with unsupervised classifier-free guidance: the unconditional branch is
    the same masked sequence with every prompt token masked too.
    """
    prompt, answer = _as_ids(prompt_ids, "prompt"), _as_ids(answer_ids, "answer")
    P, L = prompt.numel(), answer.numel()
    if mc_num < 1 or batch_size < 1 or mc_num % batch_size:
        raise ValueError(f"mc_num ({mc_num}) must be a positive multiple of batch_size ({batch_size})")
    if P + L > denoiser.max_length:
        raise ValueError(f"prompt ({P}) + answer ({L}) exceeds the model's context of {denoiser.max_length}")
    if (prompt == mask_id).any() or (answer == mask_id).any():
        raise ValueError("the prompt and the answer must not contain the mask token")
    seq = torch.cat([prompt, answer])[None]  # [1, P + L]
    slots = torch.arange(P + L)[None] >= P
    return float(gap_log_likelihood(denoiser, seq, slots, mask_id=mask_id, mc_num=mc_num, batch_size=batch_size,
                                    cfg_scale=cfg_scale, seed=seed)[0])


def gap_log_likelihood(denoiser: Denoiser, canvases: torch.Tensor, slots: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, *, mask_id: int, mc_num: int = 32,
                       batch_size: int = 256, cfg_scale: float = 0.0, seed: int | None = None) -> torch.Tensor:
    """Estimate, per row, log p(the tokens in its slots | the rest of the row) -> [N] nats (lower bounds).

    canvases [N, W] ids without the mask token; slots [N, W] bool, at least one per row (an answer
    after a prompt, or a gap inside a text); attention_mask [N, W] (0: never attended) or None.
    Each row gets mc_num samples, their mask counts stratified over [1, its slot count]; batch_size
    counts samples (rows of a forward pass). cfg_scale > 0: the unconditional branch masks every
    attended token outside the slots too.
    """
    if canvases.dim() != 2 or slots.shape != canvases.shape:
        raise ValueError(f"canvases [N, W] and slots of the same shape, got {tuple(canvases.shape)} and "
                         f"{tuple(slots.shape)}")
    if attention_mask is not None and attention_mask.shape != canvases.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != canvases {tuple(canvases.shape)}")
    if mc_num < 1 or batch_size < 1:
        raise ValueError(f"mc_num ({mc_num}) and batch_size ({batch_size}) must be positive")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    n_slots = slots.sum(1)  # [N]
    if bool((n_slots == 0).any()):
        raise ValueError("every row needs at least one slot to score")
    if bool((canvases == mask_id).any()):
        raise ValueError("the canvases must not contain the mask token")
    canvases, slots = canvases.cpu(), slots.cpu()  # the sampling of the masks runs on the CPU
    attention_mask = None if attention_mask is None else attention_mask.cpu()
    N, W = canvases.shape
    cols = slots.any(0).nonzero().flatten()
    lo, hi = int(cols[0]), int(cols[-1]) + 1  # the columns that need logits
    # 1. per sample: its row, how many slots it masks, and which (a random order of the row's slots). With a
    # seed, every row draws from its own generator: its estimate does not depend on the rest of the batch.
    rows = torch.arange(N).repeat_interleave(mc_num)  # [N * mc]
    n_masked = torch.empty(N * mc_num, dtype=torch.long)
    is_mask = torch.zeros(N * mc_num, W, dtype=torch.bool)
    for r in range(N):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        L, at = int(n_slots[r]), slice(r * mc_num, (r + 1) * mc_num)
        n_masked[at] = mask_counts(mc_num, L, gen)
        order = torch.rand(mc_num, L, generator=gen).argsort(1).argsort(1)  # [mc, L] a random rank per slot
        is_mask[at, slots[r]] = order < n_masked[at, None]  # exactly n_masked of the row's slots
    weight = n_slots[rows].float() / n_masked.float()  # [N * mc] L / l

    dev, total = denoiser.device, torch.zeros(N)
    for k in range(0, len(rows), batch_size):
        r, m = rows[k:k + batch_size], is_mask[k:k + batch_size]
        x = torch.where(m, mask_id, canvases[r]).to(dev)  # [b, W]
        attn = None if attention_mask is None else attention_mask[r].to(dev)
        if cfg_scale > 0:  # 2. with CFG, the unconditional copy: the context masked as well
            context = ~slots[r] if attention_mask is None else ~slots[r] & attention_mask[r].bool()
            x = torch.cat([x, torch.where(context.to(dev), mask_id, x)])
            attn = None if attn is None else torch.cat([attn, attn])
        # 3. logits of the slot columns only, fp32
        logits = denoiser(x, attn, logits_slice=slice(lo, hi)).logits.float()  # [b(x2), hi - lo, V]
        if cfg_scale > 0:
            cond, uncond = logits.chunk(2)
            logits = uncond + (cfg_scale + 1) * (cond - uncond)
        # 4. sum of CE over the masked slots, weighted by L / l, added to each sample's row
        ce = F.cross_entropy(logits.transpose(1, 2), canvases[r, lo:hi].to(dev), reduction="none")  # [b, hi - lo]
        per_sample = (ce * m[:, lo:hi].to(dev)).sum(1).cpu() * weight[k:k + batch_size]
        total.index_add_(0, r, per_sample)
    return -total / mc_num


def score_choices(denoiser: Denoiser, prompt_ids: Sequence[int] | torch.Tensor,
                  choices: Sequence[Sequence[int]], *, mask_id: int, mc_num: int = 128, batch_size: int = 16,
                  cfg_scale: float = 0.0, seed: int | None = 0) -> list[float]:
    """log_likelihood of each candidate answer (same seed for all: common random numbers)."""
    return [log_likelihood(denoiser, prompt_ids, c, mask_id=mask_id, mc_num=mc_num, batch_size=batch_size,
                           cfg_scale=cfg_scale, seed=seed) for c in choices]
