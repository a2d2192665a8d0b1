"""The sampler: how a masked-diffusion model turns masks into text, one step at a time.

`sample_steps` is the one sampling loop of the project (LLaDA's reference semantics). It is a generator of `Step`s, so
the UI animates it and stops it between steps, while `generate` simply runs it to the end. Every
fast decoder is an option of the same loop:

  - `threshold` / `factor`: parallel decoding, the number of tokens revealed per step adapts;
  - `cache="prefix"` / `"dual"`: once per block a full forward pass fills a K/V cache, the other
    steps of the block run only `x[:, block_start:]` (prefix) or the block itself (dual).

Whatever the mode, the LM head, the softmax and the confidence are computed only on the current
block (`logits_slice`), in fp32: positions outside the block can never be revealed, so this changes
nothing but the cost. `arm_steps` is the autoregressive baseline (greedy, KV cache) with the same
`Step` output.

The sampler only talks to the `Denoiser` interface of `backends.py` (its call, `device`,
`max_length`, `supports_cache` and `causal`); special ids come in as arguments.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .backends import Denoiser

REMASKING = ("low_confidence", "random")
# A search's second opinion: (final ids [N, L] of some candidate rows, those rows [N]) -> a score [N] each.
Rescore = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CACHE_MODES = ("none", "prefix", "dual")


@dataclass
class Step:
    """One sampling step, as the UI sees it. Tensors live on the denoiser's device."""

    ids: torch.Tensor  # [B, L] current prompt + answer ids (a copy: safe to keep)
    prompt_length: int  # the answer starts at this column (prompts are left-padded to this length)
    revealed: torch.Tensor  # [B, L] bool, positions revealed in this step
    confidence: torch.Tensor  # [B, L] float32, confidence of the revealed positions, 0 elsewhere
    step: int  # 1-based
    nfe: int  # forward passes so far (a CFG pass over the doubled batch counts once)
    done: bool  # True on the last step
    block: int = 0  # index of the block this step worked on (0 for the autoregressive sampler)
    canvas: torch.Tensor | None = None  # [B, L] the starting sequence (MASK where the sampler fills in)


@dataclass
class GenerationConfig:
    gen_length: int = 128  # answer slots (masks appended after the prompt)
    block_length: int = 32  # semi-autoregressive block size; gen_length must divide by it
    steps: int = 128  # total steps of the fixed schedule; must divide by gen_length // block_length
    temperature: float = 0.0  # 0: argmax; > 0: Gumbel-max sampling as in the reference (float64)
    cfg_scale: float = 0.0  # unsupervised classifier-free guidance weight w (0: off)
    remasking: str = "low_confidence"  # "low_confidence" (softmax prob of the proposal) or "random"
    threshold: float | None = None  # parallel decoding: reveal every candidate with confidence >= tau
    factor: float | None = None  # parallel decoding, factor variant: n-th accepted while c >= 1 - f/(n+1)
    cache: str = "none"  # "none", "prefix" or "dual" K/V cache
    suppress_eos: bool = False  # EOS logit set to -inf (the model never proposes EOS)
    eos_zero_confidence: bool = False  # a position whose proposal is EOS/EoT gets confidence 0
    constraints: dict[int, int] | None = None  # answer position -> token id, fixed (never denoised)
    seed: int | None = None  # seeds a private torch.Generator (None: the global RNG)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def adaptive(self) -> bool:
        """Threshold/factor decoding: steps per block follow the confidences, not the schedule."""
        return self.threshold is not None or self.factor is not None

    def validate(self, max_length: int, prompt_length: int, supports_cache: bool = True) -> None:
        """Raise ValueError, in words, on any combination the sampler cannot run."""
        if self.gen_length < 1 or self.block_length < 1:
            raise ValueError(f"gen_length ({self.gen_length}) and block_length ({self.block_length}) must be >= 1")
        if self.gen_length % self.block_length:
            raise ValueError(f"gen length {self.gen_length} is not divisible by block length {self.block_length}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.steps % self.num_blocks:
            raise ValueError(f"steps {self.steps} is not divisible by the number of blocks "
                             f"{self.num_blocks} (= gen length {self.gen_length} / block length {self.block_length})")
        if prompt_length < 1:
            raise ValueError("the prompt is empty")
        if prompt_length + self.gen_length > max_length:
            raise ValueError(f"the prompt ({prompt_length} tokens) + gen length ({self.gen_length}) = "
                             f"{prompt_length + self.gen_length} tokens exceeds the model's context of {max_length} "
                             "tokens: shorten the prompt (or clear the chat) or lower the gen length")
        for name in ("temperature", "cfg_scale", "threshold", "factor"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):  # NaN passes every comparison below
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {REMASKING}, got {self.remasking!r}")
        if self.threshold is not None and self.factor is not None:
            raise ValueError("threshold and factor are two variants of parallel decoding: give one, not both")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.factor is not None and self.factor <= 0:
            raise ValueError(f"factor must be > 0, got {self.factor}")
        if self.adaptive and self.remasking != "low_confidence":
            raise ValueError("threshold/factor decoding needs remasking='low_confidence' (a random "
                             "confidence has no meaning against a threshold)")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {self.cache!r}")
        if self.cache != "none" and not supports_cache:
            raise ValueError(f"cache={self.cache!r} needs a back end with a K/V cache; this one has none "
                             "(decode without a cache, or switch back to torch)")
        for pos, tok in (self.constraints or {}).items():
            if not 0 <= pos < self.gen_length:
                raise ValueError(f"constraint position {pos} is outside the answer (0..{self.gen_length - 1})")
            if tok < 0:
                raise ValueError(f"constraint token id {tok} at position {pos} is negative")


def parse_constraints(text: str, tokenizer) -> dict[int, int]:
    """ "0:Shall, 5:summer" -> {answer position: token id}, as in the original demo's word constraints.

    A word is tokenized with a leading space; a word of several tokens fills consecutive positions.
    """
    out: dict[int, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        pos, sep, word = part.partition(":")
        if not sep or not pos.strip().isdigit() or not word.strip():
            raise ValueError(f"bad constraint {part!r}: write position:word, e.g. 0:Shall")
        toks = tokenizer.encode(" " + word.strip(), add_special_tokens=False)
        for i, tok in enumerate(toks):
            out[int(pos) + i] = tok
    return out


# Each candidate of a search is a row of the batch: more than this many would only run out of memory.
MAX_CANDIDATES = 256


def parse_lengths(text: str) -> range | None:
    """ "MIN:MAX" -> the candidate answer lengths of a length search, MIN..MAX tokens; "" -> None (off)."""
    text = (text or "").strip()
    if not text:
        return None
    lo, sep, hi = text.partition(":")
    lo, hi = lo.strip(), hi.strip()
    # at most 6 digits: int() of a 4300-digit string is slow (and refused by Python), and no context is that long
    if not sep or not (lo.isascii() and lo.isdigit() and hi.isascii() and hi.isdigit()) or len(lo) > 6 or len(hi) > 6:
        raise ValueError(f"answer lengths take MIN:MAX in tokens (e.g. 8:24), got {text[:40]!r}")
    lo, hi = int(lo), int(hi)
    if not 1 <= lo <= hi:
        raise ValueError(f"answer lengths need 1 <= MIN <= MAX, got {text!r}")
    if hi - lo + 1 > MAX_CANDIDATES:
        raise ValueError(f"answer lengths {text!r} make {hi - lo + 1} candidates; at most {MAX_CANDIDATES} "
                         "(each one is a row of the batch)")
    return range(lo, hi + 1)


def format_lengths(lengths: range) -> str:
    """The inverse of parse_lengths: range(8, 25) -> "8:24"."""
    return f"{lengths.start}:{lengths.stop - 1}"


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Left-pad lists of ids to one length -> ids [B, P], attention mask [B, P] (None without padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("pad_prompts needs at least one prompt, and no empty prompt")
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids, (None if bool(mask.all()) else mask)


def block_schedule(n: int, steps: int) -> list[int]:
    """Tokens revealed at each of a block's steps: n // steps, plus one for the first n % steps.

    Steps that would reveal nothing (n < steps) are dropped: they would only repeat the same forward
    pass on the same input (the reference runs them anyway).
    """
    base, extra = divmod(n, steps)
    return [k for k in (base + (i < extra) for i in range(steps)) if k > 0]


def _make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _propose(logits: torch.Tensor, config: GenerationConfig, gen: torch.Generator | None,
             mask_only: torch.Tensor, suppressed: torch.Tensor | None, eos_id: int,
             eot_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, V] fp32 -> proposal x0 [B, T] and its confidence [B, T].

    As the reference computes them: `suppressed` ids (EOS with suppress_eos) are out of both the proposal
    and the softmax; the mask token (`mask_only`) is out of the proposal only, so the confidence is the
    softmax of the model's own logits at x0, p(MASK) included. (A proposal of MASK would "reveal" a mask
    and leave it masked; a trained model never ranks it first, an untrained one may.)
    """
    if suppressed is not None:  # out of place: the denoiser's output may be an inference-mode tensor
        logits = logits.index_fill(-1, suppressed, -torch.inf)
    proposal_logits = logits.index_fill(-1, mask_only, -torch.inf)
    if config.temperature > 0:
        # The reference's Gumbel-max trick, in float64: exp(l) / (-log U)^T.
        noise = torch.rand(logits.shape, generator=gen, dtype=torch.float64, device=logits.device)
        x0 = _argmax(proposal_logits.double().exp() / (-torch.log(noise)) ** config.temperature)
    else:
        x0 = _argmax(proposal_logits)
    if config.remasking == "low_confidence":
        conf = torch.softmax(logits, dim=-1).gather(-1, x0[..., None]).squeeze(-1)  # [B, T]
    else:
        conf = torch.rand(x0.shape, generator=gen, device=x0.device)
    if config.eos_zero_confidence:
        stop = x0 == eos_id
        if eot_id is not None:
            stop |= x0 == eot_id
        conf = conf.masked_fill(stop, 0.0)
    return x0, conf


def _argmax(t: torch.Tensor) -> torch.Tensor:
    """t.argmax(-1), the same indices (the first of equal maxima). On a CPU through NumPy: torch's argmax
    over a vocabulary took 79 us for [1, 32, 1024] here, NumPy's 5 us (the largest op of a step outside
    the denoiser)."""
    if t.device.type == "cpu":
        return torch.from_numpy(t.detach().numpy().argmax(-1))
    return t.argmax(-1)


def _count_to_reveal(conf: torch.Tensor, candidates: torch.Tensor, config: GenerationConfig,
                     k_fixed: torch.Tensor | None) -> torch.Tensor:
    """How many positions each row reveals this step -> [B] long (no host sync); k_fixed [B]: the
    fixed schedule's count (None with factor decoding)."""
    n_cand = candidates.sum(1)
    if config.factor is not None:
        ranked = conf.sort(dim=1, descending=True).values  # -inf (non-candidates) sort last
        n = torch.arange(1, conf.shape[1] + 1, device=conf.device)
        ok = ranked >= 1.0 - config.factor / (n + 1)
        k = ok.long().cumprod(1).sum(1)  # the longest run of accepted leading ranks
    else:
        return torch.minimum(k_fixed, n_cand)
    return torch.minimum(k.clamp(min=1), n_cand)  # always at least one token per step


def _threshold_mask(conf: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    """The threshold rule -> bool [B, T]: every candidate with conf >= threshold, or, in a row with none,
    its most confident candidate (ties: lower position). That is the top k with k = max(1, #above),
    found without a sort (non-candidates hold conf -inf and threshold > 0, so they are never above)."""
    above = conf >= threshold
    best = torch.zeros_like(above).scatter_(1, conf.argmax(1, keepdim=True), True) & candidates
    return torch.where(above.any(1, keepdim=True), above, best)


def _top_k_mask(conf: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """conf [B, T], k [B] -> bool [B, T] marking each row's k most confident (ties: lower position)."""
    order = conf.argsort(dim=1, descending=True, stable=True)
    take = torch.arange(conf.shape[1], device=conf.device)[None, :] < k[:, None]
    return torch.zeros_like(take).scatter(1, order, take)


def initial_sequence(prompt_ids: torch.Tensor, config: GenerationConfig, mask_id: int) -> torch.Tensor:
    """[prompt | MASK x gen_length] with the constraints already in place -> [B, P + G]."""
    B, P = prompt_ids.shape
    x = torch.full((B, P + config.gen_length), mask_id, dtype=torch.long, device=prompt_ids.device)
    x[:, :P] = prompt_ids
    for pos, tok in (config.constraints or {}).items():
        x[:, P + pos] = tok
    return x


def sample_steps(denoiser: Denoiser, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 config: GenerationConfig | None = None, *, mask_id: int, eos_id: int,
                 eot_id: int | None = None) -> Iterator[Step]:
    """Denoise [prompt | masks] block by block, yielding a Step after every forward pass.

    prompt_ids [B, P] (left-padded), attention_mask [B, P] with 0 on padding (or None).
    Closing the generator between steps stops the work; nothing runs in the background.
    """
    config = config or GenerationConfig()
    _check_request(denoiser, prompt_ids, attention_mask, config, mask_id)
    x = initial_sequence(prompt_ids.to(denoiser.device), config, mask_id)
    return _sample(denoiser, x, prompt_ids.shape[1], _full_mask(attention_mask, config.gen_length), config,
                   mask_id, eos_id, eot_id)


def _full_mask(attention_mask: torch.Tensor | None, G: int) -> torch.Tensor | None:
    """A prompt's key padding mask [B, P] extended over the G answer slots -> [B, P + G] (None stays None)."""
    if attention_mask is None:
        return None
    return torch.cat([attention_mask.long(), torch.ones(attention_mask.shape[0], G, dtype=torch.long,
                                                        device=attention_mask.device)], 1)


def _check_request(denoiser, prompt_ids, attention_mask, config: GenerationConfig, mask_id: int) -> None:
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be [batch, length], got shape {tuple(prompt_ids.shape)}")
    config.validate(denoiser.max_length, prompt_ids.shape[1], supports_cache=denoiser.supports_cache)
    if attention_mask is not None and attention_mask.shape != prompt_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != prompt shape {tuple(prompt_ids.shape)}")
    if mask_id in (config.constraints or {}).values():
        raise ValueError("a constraint cannot force the mask token")


def _sample(denoiser, x, P, attn, config, mask_id, eos_id, eot_id) -> Iterator[Step]:
    """The sampling loop over x [B, P + G] = [prompt | answer]: the answer's MASK slots are denoised, its
    other slots (constraints, given text, a search's stop token and padding; they may differ by row)
    stay. attn [B, P + G]: key padding mask over the whole sequence (0: never attended), or None."""
    dev = denoiser.device
    B, L = x.shape
    G, Lb = config.gen_length, config.block_length
    gen = _make_generator(config.seed, dev)
    attn = None if attn is None else attn.to(dev).long()
    canvas = x.clone()  # [B, L] the starting canvas: MASK where the sampler fills in (for displays)
    cfg = config.cfg_scale > 0
    # A back end that asks for it (the captured GPU path) never waits on the device inside an adaptive
    # block: each step's block-done flag is read while the next step runs, which costs one forward pass
    # per block that reveals nothing (counted in nfe, not yielded).
    deferred = config.adaptive and getattr(denoiser, "deferred_sync", False)

    # Built once: creating a tensor from a Python list inside the loop would be a host-to-device copy
    # (and so a sync) at every step on a GPU.
    mask_only = torch.tensor([mask_id], device=dev)
    suppressed = torch.tensor([eos_id], device=dev) if config.suppress_eos else None
    # Free (MASK) slots per row and block, read once before the loop; the fixed schedules are built from
    # them here, so the loop itself never waits on the device. A row whose schedule is shorter than its
    # block's longest reveals nothing in the extra steps.
    free = (x[:, P:] == mask_id).reshape(B, config.num_blocks, Lb).sum(-1).T.tolist()  # [blocks][B]
    work = [b for b in range(config.num_blocks) if max(free[b]) > 0]
    steps_per_block = config.steps // config.num_blocks
    # Each step forwards the rows from the first one whose schedule has not ended: rows sorted by free
    # slots (a length search's are) leave the batch as they finish.
    schedules = {}  # block -> tokens to reveal [B, steps] (fixed schedule only)
    first_row = {}  # block -> per step, the first row whose schedule has not ended
    if not config.adaptive:
        for b in work:
            rows = [block_schedule(n, steps_per_block) for n in free[b]]
            n_steps = max(len(r) for r in rows)
            schedules[b] = torch.tensor([r + [0] * (n_steps - len(r)) for r in rows], device=dev)
            first_row[b] = [next(j for j, r in enumerate(rows) if len(r) > i) for i in range(n_steps)]

    def forward(first_in_block: bool, bs: int, be: int, past, r0: int):
        """Rows r0.. -> fp32 logits of the block [B - r0, be-bs, V] (CFG applied), and the K/V cache to reuse."""
        x_in, attn_in = x[r0:], None if attn is None else attn[r0:]
        if cfg:  # unconditional branch: every prompt position (padding included) set to MASK
            x_u = x_in.clone()
            x_u[:, :P] = mask_id
            x_in = torch.cat([x_in, x_u])
            attn_in = None if attn_in is None else torch.cat([attn_in, attn_in])
        if config.cache == "none":
            out = denoiser(x_in, attn_in, logits_slice=slice(bs, be))
        elif first_in_block:  # once per block: the full sequence, keeping every position's K/V
            out = denoiser(x_in, attn_in, use_cache=True, logits_slice=slice(bs, be))
            past = out.past_key_values
            if config.cache == "prefix":
                past = tuple((k[:, :, :bs], v[:, :, :bs]) for k, v in past)
        elif config.cache == "prefix":  # the block and everything after it, against the prefix K/V
            out = denoiser(x_in[:, bs:], attn_in, past_key_values=past, start=bs, logits_slice=slice(0, be - bs))
        else:  # dual: only the block; prefix and suffix K/V from the cache. The block's own K/V are
            # recomputed from its current tokens at every step, so they are always fresh.
            out = denoiser(x_in[:, bs:be], attn_in, past_key_values=past, start=bs)
        logits = out.logits.float()
        if logits.shape[:2] != (x_in.shape[0], be - bs):
            raise RuntimeError(f"denoiser returned logits of shape {tuple(logits.shape)}, "
                               f"expected [{x_in.shape[0]}, {be - bs}, V]")
        if cfg:
            cond, uncond = logits.chunk(2)
            logits = uncond + (config.cfg_scale + 1) * (cond - uncond)
        return logits, past

    step = nfe = 0
    for b in work:
        bs, be = P + b * Lb, P + (b + 1) * Lb
        schedule = schedules.get(b)  # [B, steps] or None (adaptive)
        last_block = b == work[-1]
        past, past_r0, i = None, 0, 0
        held = None  # deferred: the previous Step and its block-not-done flag, not yet read
        while True:
            r0 = 0 if schedule is None else first_row[b][i]  # rows before r0 are done with this block
            if past is not None and r0 > past_r0:
                past = _drop_rows(past, r0 - past_r0, 2 if cfg else 1)
            logits, past = forward(i == 0, bs, be, past, r0)
            past_r0 = r0
            nfe += 1
            x0, conf = _propose(logits, config, gen, mask_only, suppressed, eos_id, eot_id)  # [B - r0, Lb] each
            blk = x[r0:, bs:be]  # a view: writing to it updates x
            candidates = blk == mask_id
            conf = torch.where(candidates, conf, -torch.inf)
            if config.threshold is not None:  # [B - r0, Lb] bool, only MASK slots: fixed slots are never candidates
                reveal = _threshold_mask(conf, candidates, config.threshold)
            else:
                reveal = _top_k_mask(conf, _count_to_reveal(conf, candidates, config,
                                                             None if schedule is None else schedule[r0:, i]))
            blk.copy_(torch.where(reveal, x0, blk))
            i += 1
            step += 1
            if deferred:
                block_done = False  # known one step later (below)
            elif schedule is not None:
                block_done = i == schedule.shape[1]
            else:  # adaptive: the one host sync of the loop
                block_done = not bool((blk == mask_id).any())
            frame = (bs, L - be, r0, 0)  # the block's [B - r0, Lb] padded out to [B, L]
            record = Step(ids=x.clone(), prompt_length=P, revealed=F.pad(reveal, frame),
                          confidence=F.pad(torch.where(reveal, conf, 0.0), frame), step=step, nfe=nfe,
                          done=block_done and last_block, block=b, canvas=canvas)
            if deferred:  # read the previous step's flag while this one runs; yield that step now
                flag = _HostFlag((blk == mask_id).any())
                if held is not None:
                    previous, previous_flag = held
                    if not previous_flag.get():  # it finished the block: this step revealed nothing
                        step -= 1
                        yield replace(previous, done=last_block, nfe=nfe)
                        break
                    yield previous
                held = record, flag
                continue
            yield record
            if block_done:
                break


class _HostFlag:
    """A device bool scalar for the host to read later: the copy is queued now, `get` waits for it only."""

    def __init__(self, t: torch.Tensor):
        self._event = None
        if t.device.type == "cuda":
            self._value = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._value.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._value = t

    def get(self) -> bool:
        if self._event is not None:
            self._event.synchronize()
        return bool(self._value)


def _drop_rows(past: tuple, n: int, groups: int) -> tuple:
    """A K/V cache without the first n rows of each of its `groups` stacked batches (CFG stacks two)."""
    return tuple(tuple(torch.cat([g[n:] for g in t.chunk(groups)]) for t in kv) for kv in past)


def generate(denoiser: Denoiser, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             config: GenerationConfig | None = None, *, mask_id: int, eos_id: int,
             eot_id: int | None = None) -> torch.Tensor:
    """sample_steps run to the end -> ids [B, P + gen_length] (prompt included)."""
    config = config or GenerationConfig()
    final = None
    for final in sample_steps(denoiser, prompt_ids, attention_mask, config, mask_id=mask_id,
                              eos_id=eos_id, eot_id=eot_id):
        pass
    if final is None:  # every answer slot was fixed by a constraint: nothing to denoise
        return initial_sequence(prompt_ids.to(denoiser.device), config, mask_id)
    return final.ids


def length_search_steps(denoiser: Denoiser, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        config: GenerationConfig | None = None, lengths: Sequence[int] = (), *, mask_id: int,
                        eos_id: int, eot_id: int | None = None, rescore: Rescore | None = None,
                        rescore_top: int = 0) -> Iterator[Step]:
    """Variable-length answers: decode every candidate length at once and keep, per row, the best answer.

    A fixed gen length leaves the answer's length to the sampler, and low-confidence remasking tends
    to commit the end-of-answer padding first, before the content (an answer can even come out empty).
    Here each candidate length L fixes the stop token (EoT, else EOS) at answer slot L and EOS after
    it, and the sampler fills slots 0..L-1; `candidate_steps` decodes the candidates side by side and
    keeps the most confident (plus `rescore` of the finished rows, as there; row k * B + b holds the
    k-th shortest length).
    """
    config = config or GenerationConfig()
    G = config.gen_length
    if not lengths:
        raise ValueError("length search needs at least one candidate length")
    if len(lengths) > MAX_CANDIDATES:  # before anything walks them
        raise ValueError(f"{len(lengths)} candidate lengths; at most {MAX_CANDIDATES} (each one is a row of the batch)")
    if any(not 1 <= L < G for L in lengths):
        raise ValueError(f"candidate lengths must be in [1, gen length - 1 = {G - 1}] (room for the stop "
                         f"token), got {min(lengths)}..{max(lengths)}")
    if any(p >= min(lengths) for p in (config.constraints or {})):
        raise ValueError("length search fixes the slots from the candidate length on: constraints must lie "
                         f"before the shortest candidate ({min(lengths)})")
    _check_request(denoiser, prompt_ids, attention_mask, config, mask_id)
    lengths = sorted(lengths)  # short candidates finish first and leave the batch from the top
    K, (B, P) = len(lengths), prompt_ids.shape
    x = initial_sequence(prompt_ids.to(denoiser.device), config, mask_id).repeat(K, 1)  # [K * B, P + G], row k*B + b
    for k, L in enumerate(lengths):
        x[k * B:(k + 1) * B, P + L] = eot_id if eot_id is not None else eos_id
        x[k * B:(k + 1) * B, P + L + 1:] = eos_id
    attn = _full_mask(None if attention_mask is None else attention_mask.repeat(K, 1), G)
    return candidate_steps(denoiser, x, attn, K, config, prompt_length=P, mask_id=mask_id, eos_id=eos_id,
                           eot_id=eot_id, rescore=rescore, rescore_top=rescore_top)


def candidate_steps(denoiser: Denoiser, canvases: torch.Tensor, attention_mask: torch.Tensor | None,
                    n_candidates: int, config: GenerationConfig, *, prompt_length: int, mask_id: int,
                    eos_id: int, eot_id: int | None = None, rescore: Rescore | None = None,
                    rescore_top: int = 0) -> Iterator[Step]:
    """Denoise K candidate canvases per prompt side by side; keep, per prompt, the most confident.

    canvases [K * B, P + G]: row k * B + b is candidate k of prompt b (a length search: one answer
    length per candidate; the completion protocol: a gap of each length next to a given line). The
    MASK slots after `prompt_length` are denoised, every other token stays. attention_mask [K * B, P + G]
    (0: a key never attended, e.g. right padding) or None. config.gen_length must be G.

    The candidates are rows of one batch, so the search takes as many forward passes as its longest
    candidate alone, with up to K times the rows; a row leaves the batch when its schedule ends (put the
    candidates with fewer slots first). Each prompt keeps the candidate whose revealed tokens have the
    highest mean log-confidence (ties: the earlier candidate). Every step shows, per prompt, the candidate
    leading so far (never done, its `canvas` the candidate's); the last step (done) holds the kept ones.

    `rescore(final ids [N, L], rows [N]) -> [N]` adds a second opinion to the score of the candidates
    `rows` (each k * B + b) once every candidate is filled (the completion protocol: the likelihood of its
    answer text): of each prompt's `rescore_top` most confident candidates (0: of all); the others
    are out of the running. A score of -inf rules a candidate out; a prompt whose every re-scored
    candidate is ruled out keeps the most confident of them.
    """
    if rescore_top < 0:
        raise ValueError(f"rescore_top must be >= 0 (0: every candidate), got {rescore_top}")
    if not 1 <= n_candidates <= MAX_CANDIDATES:
        raise ValueError(f"a search takes 1 to {MAX_CANDIDATES} candidates per prompt, got {n_candidates}")
    if canvases.dim() != 2 or canvases.shape[0] % n_candidates:
        raise ValueError(f"canvases must be [K * B, L] with K = {n_candidates} candidates per prompt, "
                         f"got shape {tuple(canvases.shape)}")
    P = prompt_length
    if config.gen_length != canvases.shape[1] - P:
        raise ValueError(f"gen length {config.gen_length} != canvas length {canvases.shape[1]} - prompt length {P}")
    if attention_mask is not None and attention_mask.shape != canvases.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != canvases {tuple(canvases.shape)}")
    if config.remasking != "low_confidence":
        raise ValueError("a search ranks answers by their confidences: it needs remasking='low_confidence'")
    config.validate(denoiser.max_length, P, supports_cache=denoiser.supports_cache)
    x = canvases.to(denoiser.device)
    if bool((x[:, :P] == mask_id).any()):
        raise ValueError("the prompt part of a canvas cannot hold the mask token")
    return _search(_sample(denoiser, x.clone(), P, attention_mask, config, mask_id, eos_id, eot_id), x, P,
                   n_candidates, rescore, rescore_top)


def _search(steps: Iterator[Step], x: torch.Tensor, P: int, K: int, rescore: Rescore | None = None,
            rescore_top: int = 0) -> Iterator[Step]:
    """Score the candidate rows of a step stream; x [K * B, L]: its starting canvases. rescore(final ids
    of some rows, those rows) is added to the final scores of each prompt's rescore_top most confident
    rows (0: all), the other rows drop out (not to the lead shown while the stream runs)."""
    KB, L = x.shape
    B = KB // K
    log_conf = torch.zeros(KB, device=x.device)  # [K * B] sum of the log-confidences of revealed tokens
    count = torch.zeros_like(log_conf)
    rows = torch.arange(B, device=x.device)
    step, ids = None, x

    def best(extra: torch.Tensor | float = 0.0) -> torch.Tensor:  # [B] the row (k * B + b) of each prompt's
        return (log_conf / count.clamp_min(1) + extra).view(K, B).argmax(0) * B + rows  # leader; ties: the earlier

    try:
        for step in steps:
            log_conf += torch.where(step.revealed, step.confidence.clamp_min(1e-30).log(), 0.0).sum(1)
            count += step.revealed.sum(1)
            ids, lead = step.ids, best()
            yield replace(step, ids=ids[lead], revealed=step.revealed[lead], confidence=step.confidence[lead],
                          canvas=x[lead], done=False)
    finally:
        steps.close()
    none = torch.zeros(B, L, dtype=torch.bool, device=x.device)
    extra = 0.0
    if rescore is not None and step is not None:
        top = K if rescore_top == 0 else min(rescore_top, K)
        mean = (log_conf / count.clamp_min(1)).view(K, B)
        picked = (mean.argsort(dim=0, descending=True, stable=True)[:top] * B + rows).flatten().sort().values  # [top * B]
        extra = torch.full_like(log_conf, -torch.inf)
        extra[picked] = rescore(ids[picked], picked).to(extra)
        ruled_out = torch.isneginf(extra.view(K, B)).all(0)  # [B] prompts whose every pick scored -inf ...
        extra[picked[ruled_out[picked % B]]] = 0.0  # ... keep their most confident pick
    lead = best(extra)
    yield Step(ids=ids[lead], prompt_length=P, revealed=none, confidence=none.float(),
               step=step.step if step else 0, nfe=step.nfe if step else 0, done=True, canvas=x[lead])


def generate_length_search(denoiser: Denoiser, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           config: GenerationConfig | None = None, lengths: Sequence[int] = (), *, mask_id: int,
                           eos_id: int, eot_id: int | None = None) -> torch.Tensor:
    """length_search_steps run to the end -> ids [B, P + gen_length] of the kept answers."""
    for final in length_search_steps(denoiser, prompt_ids, attention_mask, config, lengths, mask_id=mask_id,
                                     eos_id=eos_id, eot_id=eot_id):
        pass
    return final.ids


# ----------------------------------------------------------------------------------------------
# Autoregressive baseline (the ARM twin of the reversal experiment): greedy, with a K/V cache.

def arm_steps(denoiser: Denoiser, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
              max_new_tokens: int, stop_ids: Sequence[int]) -> Iterator[Step]:
    """Greedy left-to-right decoding of a causal model, one revealed position per step.

    Step.ids grows by one column per step ([B, P + step]). A row that has produced a stop id is
    finished: its later columns hold stop_ids[0]. Stops once every row is finished.
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must be a non-empty [batch, length] tensor, got {tuple(prompt_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not stop_ids:
        raise ValueError("stop_ids must hold at least one token id")
    if not denoiser.causal:
        raise ValueError("arm_steps needs a causal (autoregressive) model; this one is a masked-diffusion model")
    B, P = prompt_ids.shape
    if P + max_new_tokens > denoiser.max_length:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
                         f"{denoiser.max_length}")
    if attention_mask is not None and attention_mask.shape != prompt_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != prompt shape {tuple(prompt_ids.shape)}")
    return _arm(denoiser, prompt_ids, attention_mask, max_new_tokens, list(stop_ids))


def _arm(denoiser, prompt_ids, attention_mask, max_new_tokens, stop_ids) -> Iterator[Step]:
    dev = denoiser.device
    x = prompt_ids.to(dev)  # [B, T]
    B, P = x.shape
    attn = None if attention_mask is None else attention_mask.to(dev).long()
    stops = torch.tensor(stop_ids, dtype=torch.long, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    use_cache, past = denoiser.supports_cache, None
    for i in range(max_new_tokens):
        T = x.shape[1]
        if past is None:  # prefill (or, without cache support, the whole sequence every step)
            out = denoiser(x, attn, use_cache=use_cache, logits_slice=slice(T - 1, T))
        else:
            out = denoiser(x[:, -1:], attn, past_key_values=past, use_cache=True, start=T - 1)
        past = out.past_key_values if use_cache else None
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]
        conf, tok = probs.max(-1)
        tok = torch.where(finished, stops[0], tok)
        finished |= torch.isin(tok, stops)
        x = torch.cat([x, tok[:, None]], 1)
        if attn is not None:
            attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype, device=dev)], 1)
        revealed = torch.zeros(B, T + 1, dtype=torch.bool, device=dev)
        revealed[:, -1] = True
        confidence = torch.zeros(B, T + 1, dtype=torch.float32, device=dev)
        confidence[:, -1] = conf
        done = i == max_new_tokens - 1 or bool(finished.all())
        yield Step(ids=x.clone(), prompt_length=P, revealed=revealed, confidence=confidence,
                   step=i + 1, nfe=i + 1, done=done)
        if done:
            return


def generate_arm(denoiser: Denoiser, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, stop_ids: Sequence[int]) -> torch.Tensor:
    """arm_steps run to the end -> ids [B, P + n], n <= max_new_tokens (prompt included)."""
    final = None
    for final in arm_steps(denoiser, prompt_ids, attention_mask, max_new_tokens=max_new_tokens, stop_ids=stop_ids):
        pass
    return final.ids


def generate_answers(denoiser: Denoiser, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None, ids, *,
                     config: GenerationConfig | None = None, max_new_tokens: int = 0) -> torch.Tensor:
    """One call for both kinds of decoder (`ids`: the model's special ids, loading.SpecialIds) -> ids [B, P + n]:
    config None: the autoregressive decoder (greedy, stops at EoT/EOS, at most max_new_tokens); else the
    masked-diffusion sampler."""
    if config is None:
        return generate_arm(denoiser, prompt_ids, attention_mask, max_new_tokens=max_new_tokens,
                            stop_ids=sorted({ids.eot, ids.eos}))
    return generate(denoiser, prompt_ids, attention_mask, config, mask_id=ids.mask, eos_id=ids.eos, eot_id=ids.eot)
