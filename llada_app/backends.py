"""Denoisers: the one interface through which the sampler runs a model's forward pass.

A denoiser maps token ids (plus an optional key padding mask and K/V cache) to logits. The sampler
in `generation.py` only ever calls this interface, so the PyTorch module and an ONNX Runtime session
are interchangeable behind it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .modeling import KV, LLaDAModelLM


@dataclass
class DenoiserOutput:
    logits: torch.Tensor  # [B, T', V] for the query positions selected by logits_slice
    past_key_values: tuple[KV, ...] | None = None  # per layer (k, v) [B, n_kv, S, hd], with use_cache


class Denoiser(Protocol):
    name: str  # "torch" or "onnx", shown in the UI
    device: torch.device
    supports_cache: bool  # False: the prefix/dual cache modes are unavailable
    max_length: int  # longest sequence the model accepts

    def __call__(
        self,
        input_ids: torch.Tensor,  # [B, T] ids at positions start .. start+T-1
        attention_mask: torch.Tensor | None = None,  # [B, S] over keys; 0 = padding
        *,
        past_key_values: tuple[KV, ...] | None = None,  # see modeling.py for the cache rule
        use_cache: bool = False,
        start: int = 0,
        logits_slice: slice | None = None,  # which query positions need logits (None: all)
    ) -> DenoiserOutput: ...


class TorchDenoiser:
    """The PyTorch module, eager, under inference mode."""

    name = "torch"
    supports_cache = True

    def __init__(self, model: LLaDAModelLM):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.max_length = model.config.max_sequence_length

    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask=None, *, past_key_values=None, use_cache=False,
                 start=0, logits_slice=None) -> DenoiserOutput:
        out = self.model(input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                         use_cache=use_cache, start=start, logits_slice=logits_slice)
        return DenoiserOutput(out.logits, out.past_key_values)
