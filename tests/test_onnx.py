"""ONNX export and the ONNX Runtime back end (CPU EP): parity with PyTorch, the sampler on both back
ends, and the clear errors for exports that do not belong to the model."""
import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from export.onnx_export import (
    MANIFEST_FILE, PARITY_FILE, TOLERANCES, ExportError, cache_folder, cached_export, check_parity, export_onnx,
    onnx_denoiser)
from llada_app import generation
from llada_app.backends import OnnxBackendError, OnnxDenoiser, TorchDenoiser
from llada_app.loading import DEFAULT_MODEL, LoadedModel, ModelCard, load_model, model_fingerprint
from llada_app.modeling import LLaDAModelLM

from conftest import tiny_config

TOL = TOLERANCES["fp32"]


def _assert_close(want: torch.Tensor, got: torch.Tensor):
    assert got.shape == want.shape
    scale = want.abs().max().item()
    assert (want - got).abs().max().item() <= TOL.rel * scale, "ONNX logits differ from PyTorch"
    assert (want.argmax(-1) == got.argmax(-1)).float().mean().item() >= TOL.argmax


def _loaded(model, tokenizer, name) -> LoadedModel:
    return LoadedModel(model.eval(), tokenizer, ModelCard.build(name, tokenizer, model.config))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def onnx_root(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="session")
def tiny_export(tiny_loaded, onnx_root) -> Path:
    """The tiny model exported once per session, through the cache helper (export + parity check)."""
    return cached_export(tiny_loaded, root=onnx_root)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_export, tiny_loaded) -> OnnxDenoiser:
    return OnnxDenoiser(tiny_export, expect_config=tiny_loaded.model.config, tokenizer=tiny_loaded.tokenizer,
                        fingerprint=model_fingerprint(tiny_loaded.model))


def _random_batch(cfg, pad_id, B, T, n_pad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    if n_pad:
        ids[-1, :n_pad], mask[-1, :n_pad] = pad_id, 0
    return ids, mask


# ---------------------------------------------------------------- export and parity

def test_export_folder_layout(tiny_export, tiny_loaded):
    names = {p.name for p in tiny_export.iterdir()}
    assert {"model.onnx", "model_with_past.onnx", "config.json", "tokenizer.json", MANIFEST_FILE,
            PARITY_FILE} <= names
    manifest = json.loads((tiny_export / MANIFEST_FILE).read_text())
    assert manifest["fingerprint"] == model_fingerprint(tiny_loaded.model)
    assert manifest["dtype"] == "fp32" and manifest["graphs"]["model"]["external_data"] is False
    parity = json.loads((tiny_export / PARITY_FILE).read_text())
    assert parity["passed"] and parity["providers"][0] == "CPUExecutionProvider"
    shapes = {tuple(c["shape"][:2]) for c in parity["cases"]}
    assert {(1, 2), (2, 160)} <= shapes and any("padded" in c["case"] for c in parity["cases"])
    assert parity["max_abs_diff"] <= TOL.rel * 10  # random tiny model: |logits| is of order 1


def test_graph_axes_are_dynamic(tiny_export):
    import onnx

    graph = onnx.load(str(tiny_export / "model.onnx"), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["input_ids"] == dims["attention_mask"] and all(isinstance(d, str) for d in dims["input_ids"])
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    fused = {"Attention", "GroupQueryAttention", "MultiHeadAttention"}  # GQA is causal-only in ORT
    assert not {n.op_type for n in graph.node} & fused


def test_ort_optimiser_fuses_no_attention(tiny_export, tmp_path):
    """What ONNX Runtime actually runs at the highest optimisation level still has plain attention."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(tiny_export / "model_with_past.onnx"), opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}
    assert "Softmax" in ops and not ops & {"Attention", "GroupQueryAttention", "MultiHeadAttention"}


@pytest.mark.parametrize("B,T,n_pad", [(1, 1, 0), (1, 2, 0), (1, 33, 0), (2, 17, 5), (3, 64, 20)])
def test_logits_match_pytorch(tiny_onnx, tiny_loaded, B, T, n_pad):
    ids, mask = _random_batch(tiny_loaded.model.config, tiny_loaded.ids.pad, B, T, n_pad, seed=B * T)
    want = TorchDenoiser(tiny_loaded.model)(ids, mask).logits
    _assert_close(want, tiny_onnx(ids, mask).logits)
    # without a mask, and with a logits slice, as the sampler calls it
    _assert_close(TorchDenoiser(tiny_loaded.model)(ids, logits_slice=slice(T // 2, T)).logits,
                  tiny_onnx(ids, logits_slice=slice(T // 2, T)).logits)


def test_attention_stays_bidirectional(tiny_onnx, tiny_loaded):
    ids, _ = _random_batch(tiny_loaded.model.config, tiny_loaded.ids.pad, 1, 24, 0, seed=1)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % tiny_loaded.model.config.vocab_size
    before, after = tiny_onnx(ids).logits, tiny_onnx(changed).logits
    assert (before[0, 0] - after[0, 0]).abs().max() > 1e-4  # position 0 sees the last token


def test_padding_is_masked(tiny_onnx, tiny_loaded):
    """Padded keys are ignored: a row's logits do not depend on what sits under its padding."""
    ids, mask = _random_batch(tiny_loaded.model.config, tiny_loaded.ids.pad, 2, 20, 6, seed=2)
    other = ids.clone()
    other[1, :6] = (ids[1, :6] + 7) % tiny_loaded.model.config.vocab_size
    a, b = tiny_onnx(ids, mask).logits, tiny_onnx(other, mask).logits
    assert torch.allclose(a[1, 6:], b[1, 6:], atol=1e-5)


def test_cache_graph_matches_pytorch(tiny_onnx, tiny_loaded):
    assert tiny_onnx.supports_cache
    ref = TorchDenoiser(tiny_loaded.model)
    L, start, blk = 40, 24, 8
    ids, mask = _random_batch(tiny_loaded.model.config, tiny_loaded.ids.pad, 2, L, 9, seed=3)
    full_ref, full = ref(ids, mask, use_cache=True), tiny_onnx(ids, mask, use_cache=True)
    _assert_close(full_ref.logits, full.logits)
    for (kr, vr), (k, v) in zip(full_ref.past_key_values, full.past_key_values):
        assert torch.allclose(kr, k, atol=1e-5) and torch.allclose(vr, v, atol=1e-5)
    prefix = tuple((k[:, :, :start], v[:, :, :start]) for k, v in full.past_key_values)
    want = ref(ids[:, start:], mask, past_key_values=prefix, start=start, logits_slice=slice(0, blk))
    got = tiny_onnx(ids[:, start:], mask, past_key_values=prefix, start=start, logits_slice=slice(0, blk))
    _assert_close(want.logits, got.logits)
    want = ref(ids[:, start:start + blk], mask, past_key_values=full.past_key_values, start=start, use_cache=True)
    got = tiny_onnx(ids[:, start:start + blk], mask, past_key_values=full.past_key_values, start=start,
                    use_cache=True)
    _assert_close(want.logits, got.logits)
    assert got.past_key_values[0][0].shape == want.past_key_values[0][0].shape


def _assert_same(want, got):
    """Two denoiser outputs equal bit for bit: logits and, when returned, every K/V tensor."""
    assert torch.equal(want.logits, got.logits)
    assert (want.past_key_values is None) == (got.past_key_values is None)
    for kv, kv2 in zip(want.past_key_values or (), got.past_key_values or ()):
        assert all(torch.equal(a, b) for a, b in zip(kv, kv2))


def test_io_binding_runs_as_the_plain_path(tiny_onnx, tiny_export, tiny_loaded, monkeypatch):
    """The IO-binding code of the GPU path, run on a CPU: the same logits and K/V, bit for bit, in every
    call the sampler makes, and the same tokens; the numpy path (`session.run`) is never taken."""
    bound = OnnxDenoiser(tiny_export, expect_config=tiny_loaded.model.config, io_binding=True)
    for session in (bound.session, bound.past_session):
        monkeypatch.setattr(session, "run", lambda *a, **k: pytest.fail("the numpy path ran"))
    L, start, blk = 40, 24, 8
    ids, mask = _random_batch(tiny_loaded.model.config, tiny_loaded.ids.pad, 2, L, 9, seed=4)
    _assert_same(tiny_onnx(ids, mask), bound(ids, mask))
    want, got = tiny_onnx(ids, mask, use_cache=True), bound(ids, mask, use_cache=True)
    _assert_same(want, got)
    prefix = tuple((k[:, :, :start], v[:, :, :start]) for k, v in want.past_key_values)
    calls = [dict(input_ids=ids[:, start:start + blk], past_key_values=want.past_key_values, start=start),  # dual
             dict(input_ids=ids[:, start:], past_key_values=prefix, start=start, logits_slice=slice(0, blk))]
    for call in calls:
        _assert_same(tiny_onnx(attention_mask=mask, **call), bound(attention_mask=mask, **call))
    for mode in (dict(), dict(cache="dual", threshold=0.5), dict(cache="prefix", cfg_scale=1.0)):
        _generate_equal(bound, tiny_loaded, mode, gen_length=16, block_length=8)
    with pytest.raises(OnnxBackendError, match="always runs with IO binding"):
        OnnxDenoiser(tiny_export, device="cuda", io_binding=False)


def test_fp16_export_with_io_binding_as_on_a_gpu(tiny_loaded, tmp_path):
    """The GPU's configuration (an fp16 export, IO binding with fp16 buffers) run on a CPU: the export
    passes its parity check against the fp16 PyTorch model, and the bound path returns fp16 logits and
    K/V equal to the NumPy path's and decodes the same tokens."""
    folder = export_onnx(tiny_loaded, tmp_path / "fp16", dtype="fp16", device="cpu")
    report = check_parity(tiny_loaded, folder)
    assert report["passed"] and json.loads((folder / MANIFEST_FILE).read_text())["dtype"] == "fp16"
    plain = OnnxDenoiser(folder, expect_config=tiny_loaded.model.config)
    bound = OnnxDenoiser(folder, expect_config=tiny_loaded.model.config, io_binding=True)
    ids, mask = _random_batch(tiny_loaded.model.config, tiny_loaded.ids.pad, 2, 24, 5, seed=5)
    want, got = plain(ids, mask, use_cache=True), bound(ids, mask, use_cache=True)
    assert got.logits.dtype == torch.float16 and got.past_key_values[0][0].dtype == torch.float16
    _assert_same(want, got)
    config = generation.GenerationConfig(gen_length=16, block_length=8, steps=16, threshold=0.5, cache="dual")
    kw = dict(mask_id=tiny_loaded.ids.mask, eos_id=tiny_loaded.ids.eos, eot_id=tiny_loaded.ids.eot)
    out = generation.generate(bound, ids[:, :12], mask[:, :12], config, **kw)
    assert (out[:, 12:] != tiny_loaded.ids.mask).all()
    assert torch.equal(out, generation.generate(plain, ids[:, :12], mask[:, :12], config, **kw))


def test_session_threads_do_not_spin(tiny_onnx):
    """ORT's pool threads must not busy-wait between runs: the sampler's own torch work (and the ARM
    twin's) runs on the same cores right after each denoiser call."""
    assert tiny_onnx.past_session is not None
    for session in (tiny_onnx.session, tiny_onnx.past_session):
        assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_bad_calls_are_refused(tiny_onnx, tiny_loaded):
    L = tiny_loaded.model.config.max_sequence_length
    with pytest.raises(ValueError, match="exceeds max_sequence_length"):
        tiny_onnx(torch.zeros(1, L + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        tiny_onnx(torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="start > 0 needs past_key_values"):
        tiny_onnx(torch.zeros(1, 4, dtype=torch.long), start=4)


def test_normalisations_are_fused_and_can_be_left_standard(tiny_export, tiny_loaded, tmp_path):
    """By default every RMSNorm is one ONNX Runtime node (the first one alone, every later one with the
    residual add before it) and no decomposed norm remains; --no-fuse keeps standard ONNX operators
    only, and both pass the parity check."""
    import onnx

    n = tiny_loaded.model.config.n_layers
    manifest = json.loads((tiny_export / MANIFEST_FILE).read_text())
    plain = export_onnx(tiny_loaded, tmp_path / "plain", fuse=False)
    for file in ("model.onnx", "model_with_past.onnx"):
        ops = [node.op_type for node in onnx.load(str(tiny_export / file)).graph.node]
        assert ops.count("SimplifiedLayerNormalization") == 1 and ops.count("SkipSimplifiedLayerNormalization") == 2 * n
        assert "ReduceMean" not in ops and "Pow" not in ops
        graph = onnx.load(str(plain / file)).graph
        assert {node.domain for node in graph.node} <= {"", "ai.onnx"}
        assert sum(node.op_type == "ReduceMean" for node in graph.node) == 2 * n + 1
    assert manifest["graphs"]["model"]["fused"] == {"rms_norm": 2 * n + 1, "add_rms_norm": 2 * n}  # of which 2n merged
    assert check_parity(tiny_loaded, plain)["passed"]


@pytest.mark.parametrize("nh,nkv,T,S,causal", [(4, 2, 5, 9, False), (4, 4, 3, 3, True), (4, 2, 3, 5, True), (6, 2, 1, 7, False)])
def test_grouped_attention_is_scaled_dot_product_attention(nh, nkv, T, S, causal):
    """The graphs' attention (query heads stacked per K/V head) against SDPA on repeated K/V, with padded
    keys, and a causal mask for the twin."""
    import torch.nn.functional as F

    from export.onnx_export import grouped_attention

    g = torch.Generator().manual_seed(nh * S)
    q, k, v = (torch.randn(2, h, n, 8, generator=g) for h, n in ((nh, T), (nkv, S), (nkv, S)))
    allowed = (torch.arange(S) >= torch.tensor([[0], [2]]))[:, None, None, :]  # [B, 1, 1, S]: row 1 padded
    if causal:
        allowed = allowed & (torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None])
    bias = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)  # [B, 1, 1|T, S]
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1),
                                          attn_mask=bias)
    rows_bias = bias.repeat(1, 1, nh // nkv if causal else 1, 1)  # the layout of the graphs' embed
    torch.testing.assert_close(grouped_attention(q * q.shape[-1] ** -0.5, k, v, rows_bias), want, rtol=1e-5, atol=1e-6)


def test_graph_block_is_the_model_block(tiny_model):
    """The graphs' block (q/k/v and gate/up merged, the attention scale in q's rows, RoPE's rotation as a
    matrix) with the graphs' attention gives the model block's q (scaled), k, v and output; the rotation
    matrix is rotate_half exactly."""
    from export.onnx_export import _Block, _rotate_half_matrix, grouped_attention
    from llada_app.modeling import rope_cos_sin

    model = copy.deepcopy(tiny_model).double()
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, cfg.d_model, generator=g, dtype=torch.float64)
    r = torch.randn(3, cfg.head_dim, generator=g)
    h = cfg.head_dim // 2
    assert torch.equal(r @ _rotate_half_matrix(cfg.head_dim, torch.float32), torch.cat([-r[:, h:], r[:, :h]], -1))
    positions = torch.arange(3, 8)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, torch.float64)
    no_bias = torch.zeros(1, 1, 1, 5, dtype=torch.float64)
    rotate = _rotate_half_matrix(cfg.head_dim, torch.float64)
    for block in model.model.transformer.blocks:
        merged = _Block(block)
        q, k, v = merged.qkv(x, cos, sin, rotate)
        wq, wk, wv = block.qkv(x, cos, sin)
        for got, want in ((q, wq * cfg.head_dim ** -0.5), (k, wk), (v, wv)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        want_out, _ = block(x, cos, sin, None, None, 3, positions, False)
        got_out = merged.out_and_mlp(x, grouped_attention(q, k, v, no_bias))
        torch.testing.assert_close(got_out, want_out, rtol=1e-12, atol=1e-12)


def test_graphs_have_one_matmul_per_projection_group(tiny_export, tiny_model):
    """Per layer: q/k/v, the rotation, scores, weighted values, output, gate/up, down; then the head."""
    import onnx

    n = tiny_model.config.n_layers
    for file in ("model.onnx", "model_with_past.onnx"):
        graph = onnx.load(str(tiny_export / file)).graph
        assert sum(node.op_type == "MatMul" for node in graph.node) == 7 * n + 1, file


def test_parity_check_fails_loudly(tiny_export, tiny_tokenizer, tmp_path):
    """Checked against other weights of the same shape, the export must fail past the tolerance."""
    folder = shutil.copytree(tiny_export, tmp_path / "copy")
    torch.manual_seed(123)
    other = _loaded(LLaDAModelLM(tiny_config(tiny_tokenizer)), tiny_tokenizer, "other")
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        check_parity(other, folder)
    assert json.loads((folder / PARITY_FILE).read_text())["passed"] is False


# ---------------------------------------------------------------- the sampler on both back ends

@pytest.mark.parametrize("mode", [dict(), dict(threshold=0.5), dict(cache="prefix"), dict(cache="dual"),
                                  dict(cache="dual", threshold=0.5, cfg_scale=1.0)])
def test_generate_equal_on_both_back_ends(tiny_onnx, tiny_loaded, mode):
    _generate_equal(tiny_onnx, tiny_loaded, mode, gen_length=16, block_length=8)


@pytest.mark.parametrize("mode", [dict(cache="dual"), dict(cache="prefix", cfg_scale=1.0)])
def test_length_search_equal_on_both_back_ends(tiny_onnx, tiny_loaded, mode):
    """Candidates 3..6 leave the batch at different steps of the first block: each back end's K/V cache
    loses their rows as they go."""
    tok, ids = tiny_loaded.tokenizer, tiny_loaded.ids
    prompt, mask = generation.pad_prompts([tok("From fairest creatures")["input_ids"],
                                           tok("When forty winters shall besiege thy brow,")["input_ids"]], ids.pad)
    config = generation.GenerationConfig(gen_length=16, block_length=8, steps=16, temperature=0.0, **mode)
    kw = dict(mask_id=ids.mask, eos_id=ids.eos, eot_id=ids.eot)
    want = generation.generate_length_search(TorchDenoiser(tiny_loaded.model), prompt, mask, config, range(3, 7), **kw)
    got = generation.generate_length_search(tiny_onnx, prompt, mask, config, range(3, 7), **kw)
    assert torch.equal(want, got), f"ONNX and PyTorch disagree in mode {mode}"


def _generate_equal(onnx, loaded, mode, gen_length, block_length, prompts=None):
    tok = loaded.tokenizer
    prompts = prompts or [tok("From fairest creatures")["input_ids"],
                          tok("When forty winters shall besiege thy brow,")["input_ids"]]
    ids, mask = generation.pad_prompts(prompts, loaded.ids.pad)
    config = generation.GenerationConfig(gen_length=gen_length, block_length=block_length, steps=gen_length,
                                         temperature=0.0, **mode)
    kw = dict(mask_id=loaded.ids.mask, eos_id=loaded.ids.eos, eot_id=loaded.ids.eot)
    want = generation.generate(TorchDenoiser(loaded.model), ids, mask, config, **kw)
    got = generation.generate(onnx, ids, mask, config, **kw)
    assert (got != loaded.ids.mask).all()
    assert torch.equal(want, got), f"ONNX and PyTorch disagree in mode {mode}"


def test_causal_twin_decodes_alike(tiny_tokenizer, tmp_path):
    """The autoregressive twin (causal=True) through the cache graph: greedy decoding equal to PyTorch."""
    torch.manual_seed(3)
    loaded = _loaded(LLaDAModelLM(tiny_config(tiny_tokenizer, causal=True)), tiny_tokenizer, "arm")
    onnx = _open(export_onnx(loaded, tmp_path / "arm"), loaded)
    assert onnx.causal and onnx.supports_cache
    ids, mask = generation.pad_prompts([tiny_tokenizer("From fairest")["input_ids"],
                                        tiny_tokenizer("When forty winters shall")["input_ids"]], loaded.ids.pad)
    _assert_close(TorchDenoiser(loaded.model)(ids, mask).logits, onnx(ids, mask).logits)
    kw = dict(max_new_tokens=12, stop_ids=[loaded.ids.eos])
    want = generation.generate_arm(TorchDenoiser(loaded.model), ids, mask, **kw)
    assert torch.equal(want, generation.generate_arm(onnx, ids, mask, **kw))


# ---------------------------------------------------------------- the cache helper and onnx_denoiser

def test_cached_export_is_reused(tiny_export, tiny_loaded, onnx_root):
    assert tiny_export == cache_folder(tiny_loaded, "fp32", onnx_root)
    assert model_fingerprint(tiny_loaded.model) in tiny_export.name
    stamp = (tiny_export / "model.onnx").stat().st_mtime_ns
    denoiser = onnx_denoiser(tiny_loaded, cache_root=onnx_root)  # finds the export, no new one
    assert denoiser.folder == tiny_export and (tiny_export / "model.onnx").stat().st_mtime_ns == stamp
    assert not list(onnx_root.glob("*.partial"))


def test_fingerprint_tells_checkpoints_apart(tiny_loaded, tiny_tokenizer, tiny_model_dir):
    torch.manual_seed(7)
    other = LLaDAModelLM(tiny_config(tiny_tokenizer))
    assert model_fingerprint(other) != model_fingerprint(tiny_loaded.model)
    # the same checkpoint loaded in another dtype is the same model
    as_bf16 = load_model(str(tiny_model_dir), device="cpu", dtype="bf16").model
    assert model_fingerprint(as_bf16) == model_fingerprint(tiny_loaded.model)


def test_cli_export_with_external_data(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The CLI end to end; graphs over 2 GB keep their weights in model.onnx.data (forced by a 0 limit)."""
    import export.onnx_export as ox
    from export.__main__ import main

    monkeypatch.setattr(ox, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "cli"
    assert main(["--model", str(tiny_model_dir), "--out", str(out), "--no-with-past", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)  # the parity check ran ORT on the external-data graph
    assert report["passed"] and not (out / "model_with_past.onnx").exists()
    assert json.loads((out / MANIFEST_FILE).read_text())["graphs"]["model"]["external_data"]
    assert (out / "model.onnx.data").stat().st_size > (out / "model.onnx").stat().st_size
    assert main(["--model", str(tmp_path / "nowhere"), "--out", str(out)]) == 1
    assert "not found" in capsys.readouterr().err


def test_bench_runs(tiny_model_dir, tiny_export, capsys):
    from export.bench import main

    assert main(["--model", str(tiny_model_dir), "--onnx", str(tiny_export), "--seq", "8", "--runs", "2", "--threads", "1", "--opt", "all,basic",
                 "--gen-length", "8", "--prompt-length", "4", "--gen-runs", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["opt"] for r in report["forward"]] == ["all", "basic"]
    assert all(r["torch_ms"] > 0 and r["onnx_ms"] > 0 for r in report["forward"])
    assert [g["mode"] for g in report["generate"]] == ["vanilla", "threshold 0.9 + dual cache"]
    assert all(g["same_tokens"] for g in report["generate"])


# ---------------------------------------------------------------- exports that do not fit

@pytest.fixture(scope="session")
def other_exports(tmp_path_factory, tiny_tokenizer):
    """Exports of models with another vocabulary size and another hidden size (no cache graph)."""
    root = tmp_path_factory.mktemp("other-exports")
    out = {}
    for name, overrides in [("vocab", dict(vocab_size=len(tiny_tokenizer) + 16,
                                           embedding_size=len(tiny_tokenizer) + 24)),
                            ("hidden", dict(d_model=32, mlp_hidden_size=64))]:
        torch.manual_seed(1)
        loaded = _loaded(LLaDAModelLM(tiny_config(tiny_tokenizer, **overrides)), tiny_tokenizer, name)
        out[name] = export_onnx(loaded, root / name, with_past=False)
    return out


def _open(folder, loaded):
    return OnnxDenoiser(folder, expect_config=loaded.model.config, tokenizer=loaded.tokenizer,
                        fingerprint=model_fingerprint(loaded.model))


@pytest.mark.parametrize("kind, config_error, graph_error", [
    ("vocab", "vocabulary size", "logits per position"),
    ("hidden", "hidden size 32", "has hidden size 32"),
])
def test_export_of_another_model_is_refused(other_exports, tiny_loaded, tiny_export, tmp_path,
                                            kind, config_error, graph_error):
    with pytest.raises(OnnxBackendError, match=config_error):
        _open(other_exports[kind], tiny_loaded)
    # the graph itself is checked too: a config.json copied from the right model does not fool it
    folder = shutil.copytree(other_exports[kind], tmp_path / kind)
    shutil.copy(tiny_export / "config.json", folder / "config.json")
    with pytest.raises(OnnxBackendError, match=graph_error):
        OnnxDenoiser(folder, expect_config=tiny_loaded.model.config)


def test_other_weights_and_tokenizer_are_refused(tiny_export, tiny_loaded, tmp_path):
    with pytest.raises(OnnxBackendError, match="other weights"):
        OnnxDenoiser(tiny_export, fingerprint="0123456789abcdef")
    folder = shutil.copytree(tiny_export, tmp_path / "t")
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # a tokenizer of another training: same tokens, other ids
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(OnnxBackendError, match="tokenizer in .* differs"):
        OnnxDenoiser(folder, tokenizer=tiny_loaded.tokenizer)
    (folder / "tokenizer.json").write_text("{broken")
    with pytest.raises(OnnxBackendError, match="cannot be read"):
        OnnxDenoiser(folder, tokenizer=tiny_loaded.tokenizer)


def test_missing_and_corrupt_files(tiny_export, tiny_loaded, tmp_path):
    with pytest.raises(OnnxBackendError, match="not found"):
        OnnxDenoiser(tmp_path / "nowhere")
    folder = shutil.copytree(tiny_export, tmp_path / "m")
    (folder / "model.onnx").unlink()
    with pytest.raises(OnnxBackendError, match="no model.onnx"):
        OnnxDenoiser(folder)
    folder = shutil.copytree(tiny_export, tmp_path / "c")
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 3])  # truncated, as by an interrupted copy
    with pytest.raises(OnnxBackendError, match="corrupt"):
        OnnxDenoiser(folder)
    (folder / "model.onnx").write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(OnnxBackendError, match="corrupt"):
        OnnxDenoiser(folder)
    folder = shutil.copytree(tiny_export, tmp_path / "n")
    (folder / "config.json").unlink()
    with pytest.raises(OnnxBackendError, match="no config.json"):
        OnnxDenoiser(folder)


def test_no_cache_graph_means_no_cache_modes(other_exports, tiny_tokenizer):
    torch.manual_seed(1)
    model = LLaDAModelLM(tiny_config(tiny_tokenizer, d_model=32, mlp_hidden_size=64))
    denoiser = OnnxDenoiser(other_exports["hidden"], expect_config=model.config)
    assert denoiser.supports_cache is False
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(OnnxBackendError, match="no K/V-cache graph"):
        denoiser(ids, use_cache=True)
    _assert_close(TorchDenoiser(model)(ids).logits, denoiser(ids).logits)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when no GPU can serve")
def test_cuda_without_gpu_is_an_error_not_a_fallback(tiny_export):
    with pytest.raises(OnnxBackendError, match="CUDA"):
        OnnxDenoiser(tiny_export, device="cuda")


# ---------------------------------------------------------------- the bundled model

BUNDLED = Path(os.environ.get("LLADA_ONNX_TEST_MODEL", DEFAULT_MODEL))  # another trained model, for a dry run


@pytest.fixture(scope="session")
def bundled(tmp_path_factory):
    loaded = load_model(str(BUNDLED), device="cpu", dtype="fp32")
    folder = export_onnx(loaded, tmp_path_factory.mktemp("bundled") / "onnx")
    report = check_parity(loaded, folder)
    return loaded, folder, report


def test_bundled_model_exports_with_parity(bundled):
    loaded, folder, report = bundled
    assert report["passed"] and report["max_abs_diff"] <= TOL.rel * 100
    onnx = _open(folder, loaded)
    ids, mask = _random_batch(loaded.model.config, loaded.ids.pad, 2, 50, 11, seed=5)
    _assert_close(TorchDenoiser(loaded.model)(ids, mask).logits, onnx(ids, mask).logits)


@pytest.mark.parametrize("mode", [dict(), dict(threshold=0.9, cache="dual")])
def test_bundled_generate_equal(bundled, mode):
    from llada_app.tokenization import chat_prompt_ids

    loaded, folder, _ = bundled
    prompts = [chat_prompt_ids(loaded.tokenizer, [{"role": "user", "content": q}]) for q in
               ("What is the next line of: From fairest creatures we desire increase,",
                "What is the first line of sonnet 2?")]
    _generate_equal(_open(folder, loaded), loaded, mode, gen_length=32, block_length=32,
                    prompts=prompts)


# ---------------------------------------------------------------- broken and borrowed folders

def test_an_export_without_its_manifest_cannot_vouch_for_its_weights(tiny_export, tiny_loaded, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    (copy / MANIFEST_FILE).unlink()
    with pytest.raises(OnnxBackendError, match="no onnx_export.json with the fingerprint"):
        _open(copy, tiny_loaded)
    with pytest.raises(OnnxBackendError, match="python -m export --model .* --out NEW_FOLDER"):
        onnx_denoiser(tiny_loaded, onnx_dir=copy)  # a user's folder: the error says how to recover


def test_a_corrupt_cached_export_is_made_again(tiny_loaded, tmp_path):
    root = tmp_path / "cache"
    folder = cached_export(tiny_loaded, root=root)
    (folder / "model.onnx").write_bytes(b"\x08\x01garbage")
    denoiser = onnx_denoiser(tiny_loaded, cache_root=root)  # the cache is ours: exported again, not trusted
    assert denoiser.folder == folder and (folder / "model.onnx").stat().st_size > 1000


def test_export_never_deletes_files_it_did_not_write(tiny_export, tiny_model_dir, tmp_path, capsys):
    from export.__main__ import main

    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_export, mixed)
    (mixed / "notes.txt").write_text("mine")
    assert main(["--model", str(tiny_model_dir), "--out", str(mixed), "--no-check"]) == 1
    assert "other files (notes.txt)" in capsys.readouterr().err and (mixed / "notes.txt").read_text() == "mine"
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main(["--model", str(tiny_model_dir), "--out", str(a_file), "--no-check"]) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
