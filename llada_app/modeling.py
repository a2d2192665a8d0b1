"""LLaDA: a LLaMA-style transformer without a causal mask, in one self-contained file.

Parameter names match the official GSAI-ML/LLaDA-8B checkpoints exactly, so their safetensors load
unchanged through `from_pretrained` with these classes (registered for `model_type="llada"` when
`llada_app` is imported; no remote code runs).

Key/value caches (for the fast decoders of `generation.py`): a forward pass covers the query
positions `start .. start+T-1` of a sequence. With `past_key_values` (per layer a (k, v) pair of
shape [B, n_kv_heads, S, head_dim], already rotated), the keys attended to are

    past[:, :, :start]  ++  new K/V of the T queries  ++  past[:, :, start+T:]

which covers both the prefix cache (S == start: the cache holds the prefix only) and the dual cache
(S == full length: the block's slots are overwritten by fresh K/V). With `use_cache=True` the output
carries those concatenated keys/values, one pair per layer, ready to be passed back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel

KV = tuple[torch.Tensor, torch.Tensor]  # (k, v), each [B, n_kv_heads, S, head_dim]

# Named model shapes, the one table of them: the trainer's presets, the benchmarks' random-weight
# models and the model description (`loading.ModelCard.shape`) all read it.
SHAPES = {
    "8b": dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288, vocab_size=126464,
               max_sequence_length=4096, rope_theta=500000.0),  # LLaDA-8B's config.json (8.0B parameters)
    "1b": dict(d_model=2048, n_heads=16, n_kv_heads=16, n_layers=16, mlp_hidden_size=5632, vocab_size=126464,
               max_sequence_length=4096, rope_theta=500000.0),  # 1.34B parameters, LLaDA-8B's vocabulary
    "small": dict(d_model=256, n_heads=8, n_kv_heads=4, n_layers=6, mlp_hidden_size=704, vocab_size=1024,
                  max_sequence_length=256, rope_theta=10000.0),  # 4.9M parameters
    "sonnets": dict(d_model=128, n_heads=4, n_kv_heads=2, n_layers=4, mlp_hidden_size=384, vocab_size=1024,
                    max_sequence_length=256, rope_theta=10000.0),  # the bundled models (1.05M parameters)
}


class LLaDAConfig(PretrainedConfig):
    """Accepts the official `config.json` unchanged (its extra OLMo-era fields are kept as attributes)."""

    model_type = "llada"

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = None,  # None: same as n_heads (multi-head attention)
        n_layers: int = 32,
        mlp_hidden_size: int = 12288,  # SwiGLU hidden width
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,  # rows of wte / ff_out (>= vocab_size, padded)
        max_sequence_length: int = 4096,
        rope_theta: float = 500000.0,
        rms_norm_eps: float = 1e-5,
        activation_type: str = "silu",
        include_bias: bool = False,
        weight_tying: bool = False,
        mask_token_id: int = 126336,
        eos_token_id: int = 126081,
        pad_token_id: int = 126081,
        causal: bool = False,  # True: same architecture as an autoregressive model (the ARM baseline)
        **kwargs,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.n_layers = n_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size or vocab_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.activation_type = activation_type
        self.include_bias = include_bias
        self.weight_tying = weight_tying
        self.mask_token_id = mask_token_id
        self.causal = causal
        kwargs.setdefault("tie_word_embeddings", weight_tying)
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        if self.activation_type not in ("silu", "swiglu"):
            raise ValueError(f"unsupported activation_type {activation_type!r} (LLaDA uses silu/SwiGLU)")
        if self.include_bias:
            raise ValueError("include_bias=True is not supported (LLaDA has no biases)")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError("d_model must divide by n_heads, and n_heads by n_kv_heads")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    # Names that generic Hugging Face tooling (Optimum, ORT) looks for.
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    @property
    def num_key_value_heads(self) -> int:
        return self.n_kv_heads


@dataclass
class LLaDAOutput:
    logits: torch.Tensor | None = None  # [B, T', embedding_size]
    past_key_values: tuple[KV, ...] | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in (at least) fp32, cast back, then scale (the official order of operations).
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.to(x.dtype) * self.weight


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, head_dim] in fp32 (non-interleaved 'rotate_half' layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim)
    freqs = positions.to(dtype)[:, None] * inv_freq[None, :]  # [T, head_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, h, T, hd]; rotation computed in the dtype of cos/sin (fp32, or fp64 for a float64 model)."""
    xf = x.to(cos.dtype)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    """Pre-norm block: attention then SwiGLU MLP, both residual."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)  # gate, through silu
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)  # down projection

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, d] -> q [B, nh, T, hd] and k, v [B, nkv, T, hd], q and k rotated."""
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend_and_mlp(self, x, q, k, v, attn_bias, is_causal: bool = False) -> torch.Tensor:
        """The rest of the block, given the keys/values to attend to (k, v [B, nkv, S, hd])."""
        B, T, _ = x.shape
        if self.n_kv_heads != self.n_heads:  # GQA: share each K/V head among n_heads/n_kv_heads queries
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, is_causal=is_causal)
        x = x + self.attn_out(a.transpose(1, 2).reshape(B, T, -1))
        m = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(m)) * self.up_proj(m))

    def forward(self, x, cos, sin, attn_bias, past: KV | None, start: int | torch.Tensor, positions: torch.Tensor,
                causal: bool):
        """positions [T]: the queries' absolute positions, start .. start+T-1."""
        q, k, v = self.qkv(x, cos, sin)
        if past is not None:
            pk, pv = past
            if torch.is_tensor(start) or pk.shape[2] >= start + x.shape[1]:  # the cache holds every key:
                k, v = pk.index_copy(2, positions, k), pv.index_copy(2, positions, v)  # overwrite the queries' [B, nkv, S, hd]
            else:  # a prefix cache: the queries run on to the end of the sequence
                k, v = torch.cat([pk[:, :, :start], k], dim=2), torch.cat([pv[:, :, :start], v], dim=2)
        is_causal = causal and attn_bias is None and past is None
        return self.attend_and_mlp(x, q, k, v, attn_bias, is_causal), (k, v)


class LLaDAPreTrainedModel(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = getattr(self.config, "init_std", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class LLaDAModel(nn.Module):
    """Holds `transformer` so that parameter names read `model.transformer.*` as in the checkpoints."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.embedding_size, cfg.d_model),
            blocks=nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers)),
            ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
        ))
        if not cfg.weight_tying:
            self.transformer["ff_out"] = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)


class LLaDAModelLM(LLaDAPreTrainedModel):
    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer.wte = value

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor | None = None,  # [B, S] over keys; 0 = padding (never attended)
        past_key_values: tuple[KV, ...] | None = None,
        use_cache: bool = False,
        start: int | torch.Tensor = 0,  # absolute position of input_ids[:, 0] (0-dim tensor: with a full cache)
        logits_slice: slice | torch.Tensor | None = None,  # query positions to run the LM head on (a slice or
        # a LongTensor of positions; default: all)
        **kwargs,
    ) -> LLaDAOutput:
        cfg, tr = self.config, self.model.transformer
        B, T = input_ids.shape
        if past_key_values is not None and len(past_key_values) != cfg.n_layers:
            raise ValueError(f"past_key_values has {len(past_key_values)} layers, model has {cfg.n_layers}")
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if torch.is_tensor(start):  # a 0-dim tensor start (one compiled graph for every block) needs a full cache
            if past_len == 0:
                raise ValueError("a tensor start needs past_key_values that hold every key")
            S = past_len
        else:
            S = max(start + T, past_len)  # number of keys
        if S > cfg.max_sequence_length:
            raise ValueError(f"sequence of {S} tokens exceeds max_sequence_length {cfg.max_sequence_length}")

        x = tr.wte(input_ids)  # [B, T, d]
        rope_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 for bf16/fp16/fp32 models
        positions = start + torch.arange(T, device=x.device)  # [T]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, rope_dtype)
        attn_bias = self._attention_bias(attention_mask, B, T, S, start, positions, x)
        presents = []
        for i, block in enumerate(tr.blocks):
            past = None if past_key_values is None else past_key_values[i]
            x, present = block(x, cos, sin, attn_bias, past, start, positions, cfg.causal)
            if use_cache:
                presents.append(present)
        if logits_slice is not None:
            x = x[:, logits_slice]
        x = tr.ln_f(x)
        head = tr.wte.weight if cfg.weight_tying else tr.ff_out.weight
        logits = F.linear(x, head)
        return LLaDAOutput(logits=logits, past_key_values=tuple(presents) if use_cache else None)

    def _attention_bias(self, attention_mask, B, T, S, start, positions, x) -> torch.Tensor | None:
        """Additive bias [B, 1, T, S]: a large negative value on padded keys (and on future keys if causal)."""
        if attention_mask is None and not (self.config.causal and (torch.is_tensor(start) or start or S != T)):
            return None  # SDPA's own is_causal covers the plain causal case
        neg = torch.finfo(x.dtype).min
        allowed = torch.ones(B, 1, T, S, dtype=torch.bool, device=x.device)
        if attention_mask is not None:
            if attention_mask.shape != (B, S):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)}")
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        if self.config.causal:
            allowed = allowed & (torch.arange(S, device=x.device)[None, :] <= positions[:, None])
        bias = torch.zeros(B, 1, T, S, dtype=x.dtype, device=x.device)
        return bias.masked_fill(~allowed, neg)
