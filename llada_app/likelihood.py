"""Monte Carlo estimate of log p(answer | prompt) for a masked-diffusion model.

The ELBO of an answer of L tokens: draw l in [1, L], mask l answer tokens uniformly at random (the
prompt never), and score  sum of cross-entropies on the masked tokens * L / l.  Its expectation is
an upper bound on -log p(answer | prompt), so minus the average is a lower bound on the
log-likelihood. Within a batch the l are spread evenly over [1, L] from a random offset
(stratified, as in the LLaDA evaluation code), which lowers the variance. Used to score
multiple-choice style questions: the answer with the highest estimate wins.
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
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if P + L > denoiser.max_length:
        raise ValueError(f"prompt ({P}) + answer ({L}) exceeds the model's context of {denoiser.max_length}")
    if (prompt == mask_id).any() or (answer == mask_id).any():
        raise ValueError("the prompt and the answer must not contain the mask token")
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    dev = denoiser.device
    seq = torch.cat([prompt, answer]).to(dev)  # [P + L]

    total = 0.0
    for _ in range(mc_num // batch_size):
        # 1. how many answer tokens each sample masks, and which (a random permutation per row)
        n_masked = mask_counts(batch_size, L, gen)  # [b]
        ranks = torch.rand(batch_size, L, generator=gen).argsort(1)  # [b, L] a random order per row
        is_mask = (ranks < n_masked[:, None]).to(dev)  # [b, L] exactly n_masked[i] True per row
        # 2. the noisy batch; with CFG also the unconditional copy (prompt masked as well)
        x = seq.repeat(batch_size, 1)  # [b, P + L]
        x[:, P:] = torch.where(is_mask, mask_id, x[:, P:])
        if cfg_scale > 0:
            x_u = x.clone()
            x_u[:, :P] = mask_id
            x = torch.cat([x, x_u])
        # 3. logits of the answer positions only, fp32
        logits = denoiser(x, logits_slice=slice(P, P + L)).logits.float()  # [b(x2), L, V]
        if cfg_scale > 0:
            cond, uncond = logits.chunk(2)
            logits = uncond + (cfg_scale + 1) * (cond - uncond)
        # 4. sum of CE over the masked tokens, weighted by L / l, averaged over the batch
        ce = F.cross_entropy(logits.transpose(1, 2), answer.to(dev).expand(batch_size, L), reduction="none")  # [b, L]
        weight = (L / n_masked.to(dev).float())[:, None]  # [b, 1]
        total += float((ce * is_mask * weight).sum()) / batch_size
    return -total / (mc_num // batch_size)


def score_choices(denoiser: Denoiser, prompt_ids: Sequence[int] | torch.Tensor,
                  choices: Sequence[Sequence[int]], *, mask_id: int, mc_num: int = 128, batch_size: int = 16,
                  cfg_scale: float = 0.0, seed: int | None = 0) -> list[float]:
    """log_likelihood of each candidate answer (same seed for all: common random numbers)."""
    return [log_likelihood(denoiser, prompt_ids, c, mask_id=mask_id, mc_num=mc_num, batch_size=batch_size,
                           cfg_scale=cfg_scale, seed=seed) for c in choices]
