"""The model against an independent float64 re-computation, masks, GQA, the causal flag and the K/V cache."""
import math

import pytest
import torch

from conftest import tiny_config
from llada_app.modeling import LLaDAConfig, LLaDAModelLM


def reference_logits(model: LLaDAModelLM, ids: torch.Tensor, key_mask=None, causal=False) -> torch.Tensor:
    """Plain float64 matmuls, RMSNorm, RoPE and softmax attention, written from the architecture's description."""
    cfg = model.config
    W = {k: v.double() for k, v in model.state_dict().items()}
    p = "model.transformer."
    B, L = ids.shape
    nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    inv = torch.tensor([1.0 / cfg.rope_theta ** (2 * i / hd) for i in range(hd // 2)], dtype=torch.float64)
    ang = torch.arange(L, dtype=torch.float64)[:, None] * inv[None]  # [L, hd/2]
    cos, sin = ang.cos(), ang.sin()

    def rope(x):  # x [B, h, L, hd]; first half / second half pairs
        a, b = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    x = W[p + "wte.weight"][ids]
    for i in range(cfg.n_layers):
        q_ = f"{p}blocks.{i}."
        h = rms(x, W[q_ + "attn_norm.weight"])
        q = (h @ W[q_ + "q_proj.weight"].T).view(B, L, nh, hd).transpose(1, 2)
        k = (h @ W[q_ + "k_proj.weight"].T).view(B, L, nkv, hd).transpose(1, 2)
        v = (h @ W[q_ + "v_proj.weight"].T).view(B, L, nkv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        group = nh // nkv
        out = torch.empty(B, nh, L, hd, dtype=torch.float64)
        for head in range(nh):
            kh, vh = k[:, head // group], v[:, head // group]  # query head -> its shared K/V head
            s = q[:, head] @ kh.transpose(-1, -2) / math.sqrt(hd)  # [B, L, L]
            if key_mask is not None:
                s = s.masked_fill(~key_mask.bool()[:, None, :], float("-inf"))
            if causal:
                s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
            out[:, head] = torch.softmax(s, -1) @ vh
        x = x + out.transpose(1, 2).reshape(B, L, -1) @ W[q_ + "attn_out.weight"].T
        m = rms(x, W[q_ + "ff_norm.weight"])
        gate, up = m @ W[q_ + "ff_proj.weight"].T, m @ W[q_ + "up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ W[q_ + "ff_out.weight"].T
    return rms(x, W[p + "ln_f.weight"]) @ W[p + "ff_out.weight"].T


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 300, (2, 12))


def test_official_parameter_names(tiny_model):
    names = set(tiny_model.state_dict())
    for n in ["model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"] + [
        f"model.transformer.blocks.0.{m}.weight" for m in
        ["attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"]
    ]:
        assert n in names, n
    cfg = tiny_model.config
    hd = cfg.d_model // cfg.n_heads
    assert tiny_model.state_dict()["model.transformer.blocks.0.k_proj.weight"].shape == (cfg.n_kv_heads * hd, cfg.d_model)


def test_matches_float64_reference_with_gqa(tiny_model, ids):
    assert tiny_model.config.n_kv_heads < tiny_model.config.n_heads  # GQA is exercised
    got = tiny_model.double()(ids).logits
    tiny_model.float()
    torch.testing.assert_close(got, reference_logits(tiny_model, ids), rtol=1e-9, atol=1e-9)


def test_matches_reference_with_padding_mask(tiny_model, ids):
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on the second row
    got = tiny_model.double()(ids, attention_mask=mask).logits
    tiny_model.float()
    ref = reference_logits(tiny_model, ids, key_mask=mask)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    # Padded keys are really ignored: changing a padded token does not move the real positions' logits.
    ids2 = ids.clone()
    ids2[1, :5] = (ids2[1, :5] + 7) % 300
    got2 = tiny_model(ids2, attention_mask=mask).logits
    torch.testing.assert_close(got2[1, 5:], tiny_model(ids, attention_mask=mask).logits[1, 5:])


def test_fp32_close_to_reference(tiny_model, ids):
    got = tiny_model(ids).logits.double()
    torch.testing.assert_close(got, reference_logits(tiny_model, ids), rtol=1e-4, atol=1e-4)


def test_bidirectional_sees_the_future_and_causal_does_not(tiny_tokenizer, tiny_model, ids):
    later = ids.clone()
    later[:, -1] = (later[:, -1] + 1) % 300
    bi = tiny_model(ids).logits, tiny_model(later).logits
    assert (bi[0][:, 0] - bi[1][:, 0]).abs().max() > 1e-4  # position 0 saw the last token

    torch.manual_seed(0)
    causal = LLaDAModelLM(tiny_config(tiny_tokenizer, causal=True)).eval()
    with torch.no_grad():
        a, b = causal(ids).logits, causal(later).logits
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=0)  # earlier positions unchanged
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-4
    causal.double()
    torch.testing.assert_close(causal(ids).logits, reference_logits(causal, ids, causal=True), rtol=1e-9, atol=1e-9)


def test_kv_cache_prefix_and_dual_match_full_forward(tiny_model, ids):
    full = tiny_model(ids, use_cache=True)
    past = full.past_key_values
    assert len(past) == tiny_model.config.n_layers and past[0][0].shape[2] == ids.shape[1]
    s, e = 4, 8
    prefix = tuple((k[:, :, :s], v[:, :, :s]) for k, v in past)
    out_prefix = tiny_model(ids[:, s:], past_key_values=prefix, start=s)  # queries s..L-1
    torch.testing.assert_close(out_prefix.logits, full.logits[:, s:], rtol=1e-5, atol=1e-5)
    out_dual = tiny_model(ids[:, s:e], past_key_values=past, start=s, use_cache=True)  # queries s..e-1
    torch.testing.assert_close(out_dual.logits, full.logits[:, s:e], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_dual.past_key_values[0][0], past[0][0], rtol=1e-5, atol=1e-5)
    sliced = tiny_model(ids, logits_slice=slice(s, e)).logits
    torch.testing.assert_close(sliced, full.logits[:, s:e])


def test_config_accepts_official_fields_and_rejects_bad_ones():
    official = dict(
        activation_type="silu", alibi=False, block_type="llama", d_model=4096, embedding_size=126464,
        eos_token_id=126081, flash_attention=False, include_bias=False, init_device="meta",
        layer_norm_type="rms", mask_token_id=126336, max_sequence_length=4096, mlp_hidden_size=12288,
        mlp_ratio=4, model_type="llada", n_heads=32, n_kv_heads=32, n_layers=32, pad_token_id=126081,
        rms_norm_eps=1e-05, rope=True, rope_theta=500000.0, vocab_size=126464, weight_tying=False,
        auto_map={"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM"})
    cfg = LLaDAConfig(**official)
    assert (cfg.d_model, cfg.n_layers, cfg.head_dim, cfg.mask_token_id, cfg.causal) == (4096, 32, 128, 126336, False)
    with pytest.raises(ValueError, match="n_heads"):
        LLaDAConfig(d_model=100, n_heads=3)
    with pytest.raises(ValueError, match="activation"):
        LLaDAConfig(activation_type="gelu")


def test_too_long_sequence_and_bad_mask_are_refused(tiny_model):
    L = tiny_model.config.max_sequence_length
    with pytest.raises(ValueError, match="max_sequence_length"):
        tiny_model(torch.zeros(1, L + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        tiny_model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5))
