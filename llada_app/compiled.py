"""The captured fast path: the PyTorch denoiser at a few static shapes, compiled once per shape.

gpt-fast's recipe, kept outside the model class. On a GPU an eager step of a large model is bound by
kernel launches, so the step must be one replayed graph (`torch.compile(mode="reduce-overhead")`
records CUDA graphs); a graph needs static shapes, so every call is padded to one of a few:

  - the sequence is padded on the right to the next multiple of `bucket` positions; the padded keys
    are masked out (no attention weight) and the padded queries' outputs are dropped, so the real
    positions compute what the eager model computes;
  - the full forward runs the LM head on the block's positions given as a tensor, not a slice, and
    the dual-cache block step takes its start position as a 0-dim tensor: every block replays the
    same two graphs;
  - the K/V cache is handed back as views of the padded buffers (the real length, as eager), which
    the next block step widens again without a copy.

Calls at other shapes run the same padded computation eagerly: batch sizes outside `batch_sizes`
(CFG doubles the batch; a length search drops rows as its candidates finish, so the length search
stays eager), the prefix cache, and anything beyond the model's context. `calls` counts both kinds.
Compiling costs seconds per shape, so the app chooses this path once, at start-up (`--compile`).
"""
from __future__ import annotations

import time
from collections import Counter

import torch

from .backends import DenoiserOutput, TorchDenoiser
from .modeling import LLaDAModelLM


class CompiledDenoiser(TorchDenoiser):
    """A TorchDenoiser whose full forward and dual-cache block step run compiled at static shapes."""

    def __init__(self, model: LLaDAModelLM, *, bucket: int = 128, batch_sizes=(1,), mode: str | None = None,
                 deferred_sync: bool | None = None):
        super().__init__(model)
        if self.causal:
            raise ValueError("the captured path serves masked-diffusion models; the autoregressive twin runs eagerly")
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        self.bucket, self.batch_sizes = bucket, frozenset(batch_sizes)
        cuda = self.device.type == "cuda"
        self.mode = mode or ("reduce-overhead" if cuda else "default")
        # The threshold rule's block-done flag is read one step late on a GPU, so the host never waits.
        self.deferred_sync = cuda if deferred_sync is None else deferred_sync
        self._full = torch.compile(self._full_eager, mode=self.mode, dynamic=False, fullgraph=True)
        self._block = torch.compile(self._block_eager, mode=self.mode, dynamic=False, fullgraph=True)
        self.calls = Counter()  # "full" / "block" (compiled), "eager"
        self.compile_s = 0.0  # seconds spent in the first call at each new shape (mostly compiling)
        self._shapes = set()

    # The two computations, as plain functions of tensors (what torch.compile captures).
    def _full_eager(self, ids, mask, head_positions, use_cache: bool):
        out = self.model(ids, attention_mask=mask, use_cache=use_cache, logits_slice=head_positions)
        return out.logits, out.past_key_values

    def _block_eager(self, ids, mask, past, start):
        return self.model(ids, attention_mask=mask, past_key_values=past, start=start).logits

    def _padded_length(self, n: int) -> int:
        return min(-(-n // self.bucket) * self.bucket, self.max_length)

    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask=None, *, past_key_values=None, use_cache=False,
                 start=0, logits_slice=None) -> DenoiserOutput:
        B, T = input_ids.shape
        compiled = B in self.batch_sizes
        if past_key_values is None and start == 0 and not isinstance(logits_slice, torch.Tensor):
            return self._full_call(input_ids, attention_mask, use_cache, logits_slice, compiled)
        S = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if past_key_values is not None and not use_cache and logits_slice is None and S >= start + T:
            return self._block_call(input_ids, attention_mask, past_key_values, start, compiled)
        self.calls["eager"] += 1  # the prefix cache, or a call shape the sampler does not make
        return super().__call__(input_ids, attention_mask, past_key_values=past_key_values, use_cache=use_cache,
                                start=start, logits_slice=logits_slice)

    def _full_call(self, ids, mask, use_cache, logits_slice, compiled) -> DenoiserOutput:
        B, L = ids.shape
        Lp = self._padded_length(L)
        if Lp < L:
            raise ValueError(f"sequence of {L} tokens exceeds max_sequence_length {self.max_length}")
        head = torch.arange(L, device=self.device)[logits_slice if logits_slice is not None else slice(None)]
        ids_p = torch.zeros(B, Lp, dtype=ids.dtype, device=self.device)
        ids_p[:, :L] = ids
        self.calls["full" if compiled else "eager"] += 1
        logits, past = self._run(self._full if compiled else self._full_eager, ("full", B, Lp, len(head), use_cache),
                                 ids_p, self._padded_mask(mask, B, L, Lp), head, use_cache)
        # Copied out of the graph's memory (the next replay overwrites it); the cache as views of the
        # real length, so a caller sees exactly what the eager model returns.
        logits = logits.clone()
        if past is not None:
            past = tuple((_copy(k)[:, :, :L], _copy(v)[:, :, :L]) for k, v in past)
        return DenoiserOutput(logits, past)

    def _block_call(self, ids, mask, past, start, compiled) -> DenoiserOutput:
        B, T = ids.shape
        S = past[0][0].shape[2]
        Sp = self._padded_length(S)
        past_p = tuple((_widen(k, Sp), _widen(v, Sp)) for k, v in past)
        self.calls["block" if compiled else "eager"] += 1
        start_t = start if torch.is_tensor(start) else torch.full((), start, dtype=torch.long, device=self.device)
        logits = self._run(self._block if compiled else self._block_eager, ("block", B, T, Sp),
                           _copy(ids), self._padded_mask(mask, B, S, Sp), past_p, start_t)
        return DenoiserOutput(logits.clone(), None)

    def _run(self, fn, shape: tuple, *args):
        if fn not in (self._full, self._block):
            return fn(*args)
        torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs were copied out
        if shape in self._shapes:
            return fn(*args)
        t = time.perf_counter()  # a new shape: compiled (and, with CUDA graphs, recorded) in this call
        out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compile_s += time.perf_counter() - t
        self._shapes.add(shape)
        return out

    def _padded_mask(self, mask, B: int, n: int, n_padded: int) -> torch.Tensor:
        """A key padding mask [B, n] (or None: all real) widened with zeros to [B, n_padded]."""
        out = torch.zeros(B, n_padded, dtype=torch.long, device=self.device)
        out[:, :n] = 1 if mask is None else mask
        return out


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def _widen(t: torch.Tensor, n: int) -> torch.Tensor:
    """A cache tensor [B, h, S, d] -> [B, h, n, d] holding it in its first S slots: the padded buffer it
    is a view of when it came from `_full_call` (no copy), else a zero-padded copy (dropped rows, say)."""
    B, h, S, d = t.shape
    if S == n:
        return t
    if t.stride() == (h * n * d, n * d, d, 1) and t.untyped_storage().nbytes() >= (t.storage_offset() + B * h * n * d) * t.element_size():
        return t.as_strided((B, h, n, d), t.stride())
    return torch.cat([t, t.new_zeros(B, h, n - S, d)], dim=2)
