"""Export a LLaDA denoiser to ONNX, check it against PyTorch, and keep exports in a reusable cache.

An export folder follows the Hugging Face / Optimum layout, so other ONNX tooling can open it:

    model.onnx               input_ids [batch, seq] int64, attention_mask [batch, seq] int64
                             -> logits [batch, seq, vocab]           (the plain denoiser)
    model.onnx.data          the weights, only when the graph is over 2 GB (likewise for the cache graph)
    model_with_past.onnx     the K/V-cache variant (optional, see `CacheGraph`)
    config.json, tokenizer files
    onnx_export.json         manifest: source model, weight fingerprint, dtype, opset, graphs
    parity.json              the PyTorch vs ONNX Runtime check (with --check)

The graphs compute the model's forward with fewer, larger operations than modeling.py (`_Block`: one
matmul for q/k/v and one for gate/up, RoPE as a matmul), same values up to rounding. Attention stays
bidirectional: the graphs write it as plain MatMul/Softmax (`grouped_attention`, exported at opset 18,
which has no attention operator), and sessions are created with ONNX Runtime's generic graph optimiser
only (never the LLaMA/GPT-2 presets of `onnxruntime.transformers`, which assume a causal mask). The one
fusion applied at export (`fuse=True`, the default) touches no attention: each RMSNorm, and each
residual add with the RMSNorm after it, becomes one ONNX Runtime normalisation node
(SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization); `fuse=False` keeps every node a
standard ONNX operator. The bundled model's cache graph: 350 nodes written as modeling.py runs, 163 as
exported.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llada_app.backends import past_names
from llada_app.loading import model_fingerprint
from llada_app.modeling import LLaDAModelLM, rope_cos_sin

Progress = Callable[[float, str], None]  # (fraction done in [0, 1], what is happening)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_OPSET = 18  # the exporter's own opset, without an Attention operator
MODEL_FILE, PAST_FILE, MANIFEST_FILE, PARITY_FILE = (
    "model.onnx", "model_with_past.onnx", "onnx_export.json", "parity.json")
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; keep room for the graph itself
CACHE_ROOT = Path(os.environ.get("LLADA_STUDIO_CACHE", Path.home() / ".cache" / "llada-studio")) / "onnx"


class ExportError(RuntimeError):
    """The export or its parity check failed; the message says why."""


@dataclass(frozen=True)
class Tolerance:
    rel: float  # max |Δlogits| / max |logits| allowed
    argmax: float  # smallest fraction of positions whose argmax must agree


# Reference and graph run in the same dtype, so half precision only differs by kernel rounding.
TOLERANCES = {"fp32": Tolerance(rel=1e-4, argmax=0.99),
              "fp16": Tolerance(rel=2e-2, argmax=0.9),
              "bf16": Tolerance(rel=5e-2, argmax=0.9)}


# ---------------------------------------------------------------- graphs

class _Graph(nn.Module):
    """The model's weights as both graphs use them, and its embedding and head.

    Each block becomes a `_Block`; the embedding, the norms, the attention output and down projections
    and the head are the model's own modules (shared, not copied)."""

    def __init__(self, model: LLaDAModelLM):
        super().__init__()
        self.config = cfg = model.config
        tr = model.model.transformer
        self.wte, self.ln_f = tr.wte, tr.ln_f
        self.head = tr.wte if cfg.weight_tying else tr.ff_out
        self.blocks = nn.ModuleList(_Block(b) for b in tr.blocks)
        rope_dtype = torch.promote_types(tr.wte.weight.dtype, torch.float32)  # as modeling.apply_rope
        self.register_buffer("rotate", _rotate_half_matrix(cfg.head_dim, rope_dtype), persistent=False)

    def embed(self, input_ids, positions, keys, attention_mask):
        """-> embeddings [B, T, d], RoPE cos/sin [T, hd] at the queries' positions [T], and the additive
        attention bias over keys [S] (padding, and the future for a causal model) in the row layout of
        `grouped_attention`: [B, 1, 1, S], or [B, 1, g T, S] for a causal model (g query heads per K/V head)."""
        cfg = self.config
        x = self.wte(input_ids)  # [B, T, d]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, self.rotate.dtype)
        allowed = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, S]
        if cfg.causal:
            allowed = allowed & (keys[None, :] <= positions[:, None])  # [B, 1, T, S]
            allowed = allowed.repeat(1, 1, cfg.n_heads // cfg.n_kv_heads, 1)  # [B, 1, g T, S]
        bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~allowed, torch.finfo(x.dtype).min)
        return x, cos, sin, bias

    def logits(self, x):
        return F.linear(self.ln_f(x), self.head.weight)


class LogitsGraph(_Graph):
    """input_ids [B, T], attention_mask [B, T] -> logits [B, T, V]: the full bidirectional forward."""

    def forward(self, input_ids, attention_mask):
        keys = torch.arange(input_ids.shape[1], device=input_ids.device)  # [T]: queries and keys alike
        x, cos, sin, bias = self.embed(input_ids, keys, keys, attention_mask)
        for block in self.blocks:
            q, k, v = block.qkv(x, cos, sin, self.rotate)
            x = block.out_and_mlp(x, grouped_attention(q, k, v, bias))
        return self.logits(x)


class CacheGraph(_Graph):
    """The forward pass with K/V caches, with `start` as a tensor so one graph serves every block.

    Inputs: input_ids [B, T] (positions start .. start+T-1), attention_mask [B, S] over keys,
    start [] int64, and per layer past key/value [B, n_kv, S, hd]. Outputs: logits [B, T, V] and per
    layer present key/value [B, n_kv, S, hd] = the past with slots start .. start+T-1 overwritten by
    the fresh K/V. That is modeling.py's cache rule with the past padded to the full length S: the
    dual cache passes its past as it is; the prefix cache (past length == start) pads it with T
    zero slots first, which are then overwritten. The slices of modeling.py (`past[:, :, :start]`)
    would need `start` as a Python int, which would bake one block position into the graph; here the
    overwrite is a gather + where on positions, which keeps every shape symbolic.
    """

    def forward(self, input_ids, attention_mask, start, *past):
        T = input_ids.shape[1]
        positions = start + torch.arange(T, device=input_ids.device)  # [T] absolute query positions
        keys = torch.arange(attention_mask.shape[1], device=input_ids.device)  # [S]
        x, cos, sin, bias = self.embed(input_ids, positions, keys, attention_mask)
        fresh = ((keys >= start) & (keys < start + T))[None, None, :, None]  # [1, 1, S, 1]
        take = (keys - start).clamp(0, T - 1)  # [S] which new K/V row lands in each key slot
        presents = []
        for i, block in enumerate(self.blocks):
            q, k, v = block.qkv(x, cos, sin, self.rotate)
            k = torch.where(fresh, k.index_select(2, take), past[2 * i])  # [B, nkv, S, hd]
            v = torch.where(fresh, v.index_select(2, take), past[2 * i + 1])
            x = block.out_and_mlp(x, grouped_attention(q, k, v, bias))
            presents += [k, v]
        return (self.logits(x), *presents)


class _Block(nn.Module):
    """One LLaDA block as the graphs compute it, with fewer and larger matmuls than modeling.py's:
    q, k and v come from one matmul (the attention scale 1/sqrt(hd) folded into q's rows), RoPE is
    x * cos + (x @ R) * sin with R the rotate_half permutation as a [hd, hd] matrix of 0 and +-1 (exact),
    applied to q and k together, and gate and up come from one matmul. Same values as the model's block
    up to rounding; the merged matrices are copies made for the export."""

    def __init__(self, block):
        super().__init__()
        self.attn_norm, self.attn_out, self.ff_norm, self.ff_out = (
            block.attn_norm, block.attn_out, block.ff_norm, block.ff_out)
        self.nh, self.nkv, self.hd = block.n_heads, block.n_kv_heads, block.head_dim
        q = block.q_proj.weight
        merged = torch.cat([(q.float() * self.hd ** -0.5).to(q.dtype), block.k_proj.weight, block.v_proj.weight])
        self.qkv_weight = nn.Parameter(merged.detach(), requires_grad=False)  # [(nh + 2 nkv) hd, d]
        self.gate_up_weight = nn.Parameter(torch.cat([block.ff_proj.weight, block.up_proj.weight]).detach(),
                                           requires_grad=False)  # [2 hidden, d]

    def qkv(self, x, cos, sin, rotate):
        """x [B, T, d] -> q (scaled) [B, nh, T, hd] and k, v [B, nkv, T, hd], q and k rotated."""
        B, T, _ = x.shape
        y = F.linear(self.attn_norm(x), self.qkv_weight).view(B, T, -1, self.hd).transpose(1, 2)
        qk, v = y.split([self.nh + self.nkv, self.nkv], dim=1)  # [B, nh + nkv, T, hd], [B, nkv, T, hd]
        r = qk.to(cos.dtype)
        q, k = (r * cos + (r @ rotate) * sin).to(x.dtype).split([self.nh, self.nkv], dim=1)
        return q, k, v

    def out_and_mlp(self, x, a):
        """x [B, T, d], the attention's output a [B, nh, T, hd] -> the block's output [B, T, d]."""
        B, T, _ = x.shape
        x = x + self.attn_out(a.transpose(1, 2).reshape(B, T, -1))
        gate, up = F.linear(self.ff_norm(x), self.gate_up_weight).chunk(2, dim=-1)
        return x + self.ff_out(F.silu(gate) * up)


def _rotate_half_matrix(head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """R [hd, hd] with x @ R == cat([-x2, x1]) for x = cat([x1, x2]) (modeling.apply_rope's rotation)."""
    h = head_dim // 2
    r = torch.zeros(head_dim, head_dim, dtype=dtype)
    r[torch.arange(h) + h, torch.arange(h)] = -1.0  # out[:h] = -x[h:]
    r[torch.arange(h), torch.arange(h) + h] = 1.0  # out[h:] = x[:h]
    return r


def grouped_attention(q, k, v, bias):
    """Softmax attention as the graphs compute it: q [B, nh, T, hd] already scaled by 1/sqrt(hd) (`_Block`
    folds the scale into its weights), k, v [B, nkv, S, hd] -> [B, nh, T, hd]. The g = nh / nkv query heads
    that share a K/V head are stacked along the rows of one matmul (row j * T + t: head j of the group,
    query t), so no K/V copy is made (repeat_interleave) and K is transposed once, same values. bias
    broadcasts to those rows, [B, nkv, g T, S]: [B, 1, 1, S] (padding only) or [B, 1, g T, S]."""
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    rows = (nh // nkv) * T
    weights = torch.softmax(q.reshape(B, nkv, rows, hd) @ k.transpose(2, 3) + bias, dim=-1)  # [B, nkv, rows, S]
    return (weights @ v).reshape(B, nh, T, hd)


# ---------------------------------------------------------------- export

def export_onnx(loaded, out_dir: str | os.PathLike, *, dtype: str = "fp32", device: str = "cpu",
                opset: int = DEFAULT_OPSET, with_past: bool = True, fuse: bool = True,
                progress: Progress | None = None) -> Path:
    """Export `loaded` (a llada_app.loading.LoadedModel) into `out_dir`; returns the folder.

    The model is exported in `dtype` on `device`; if the loaded model sits elsewhere, a converted
    copy is made (which needs the memory of a second model). The folder is written under a
    temporary name and renamed at the end, so a crash never leaves a half-written export.
    """
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    progress = progress or (lambda f, msg: None)
    out = Path(out_dir).expanduser().resolve()
    _check_replaceable(out)
    model = _model_for_export(loaded.model, DTYPES[dtype], torch.device(device))
    cfg = model.config
    fingerprint = loaded.fingerprint

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the export private to this user
    try:
        t0 = time.perf_counter()
        progress(0.0, "exporting the denoiser graph")
        external, fused = _export_graph(LogitsGraph(model), model, tmp / MODEL_FILE, opset, False, fuse)
        graphs = {"model": dict(file=MODEL_FILE, inputs=["input_ids", "attention_mask"], outputs=["logits"],
                                external_data=external, fused=fused)}
        if with_past:
            progress(0.45, "exporting the K/V-cache graph")
            external_p, fused_p = _export_graph(CacheGraph(model), model, tmp / PAST_FILE, opset, True, fuse)
            pin, pout = past_names(cfg.n_layers)
            graphs["model_with_past"] = dict(
                file=PAST_FILE, inputs=["input_ids", "attention_mask", "start", *pin],
                outputs=["logits", *pout], external_data=external_p, fused=fused_p)
        progress(0.9, "writing config and tokenizer")
        cfg.save_pretrained(tmp)
        if loaded.tokenizer is not None:  # None only for random-weight benchmark models
            loaded.tokenizer.save_pretrained(tmp)
        manifest = dict(
            source=loaded.name, fingerprint=fingerprint, dtype=dtype, opset=opset,
            export_device=str(device), graphs=graphs, vocab_size=cfg.vocab_size,
            embedding_size=cfg.embedding_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
            n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, causal=cfg.causal,
            export_seconds=round(time.perf_counter() - t0, 2), versions=_versions())
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(1.0, f"exported to {out}")
    return out


def _export_files(folder: Path) -> set[str]:
    """The names an export folder may hold: its graphs (and their data files), the manifest, the parity
    report, the config and the tokenizer files."""
    return ({MODEL_FILE, PAST_FILE, MANIFEST_FILE, PARITY_FILE, "config.json", "generation_config.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
            | {p.name for p in folder.glob("*.onnx.data")} | {p.name for p in folder.glob("*.onnx_data")})


def _check_replaceable(out: Path) -> None:
    """An export replaces only an empty folder or an earlier export with nothing else in it."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder: give --out a folder to write the export into")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / MANIFEST_FILE).is_file():
        raise ExportError(f"{out} exists and is not an ONNX export folder; refusing to overwrite it")
    others = sorted(p.name for p in out.iterdir() if p.name not in _export_files(out))
    if others:
        raise ExportError(f"{out} holds an earlier export and other files ({', '.join(others[:5])}); refusing to "
                          "delete them: export into another folder, or move them away")


def _model_for_export(model: LLaDAModelLM, dtype: torch.dtype, device: torch.device) -> LLaDAModelLM:
    p = next(model.parameters())
    if p.dtype == dtype and p.device.type == device.type:
        return model.eval()
    return copy.deepcopy(model).to(device=device, dtype=dtype).eval()


def _export_graph(graph: nn.Module, model: LLaDAModelLM, path: Path, opset: int, with_past: bool,
                  fuse: bool) -> tuple[bool, dict[str, int]]:
    """Trace `graph` with torch.export (dynamo), fuse its normalisations (`fuse`) and save it
    -> (whether weights went to a data file, nodes fused by kind).

    Example inputs have batch 2 and seq >= 2 so that neither axis is specialised to 0/1.
    """
    cfg = model.config
    dev = next(model.parameters()).device
    dim = torch.export.Dim
    batch = dim("batch", min=1, max=4096)
    seq = dim("seq", min=1, max=cfg.max_sequence_length)
    B, T = 2, 8
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    if not with_past:
        args = (ids, torch.ones(B, T, dtype=torch.long, device=dev))
        shapes = ({0: batch, 1: seq}, {0: batch, 1: seq})
        names, outputs = ["input_ids", "attention_mask"], ["logits"]
    else:
        total = dim("total", min=1, max=cfg.max_sequence_length)
        S, start = 3 * T, T  # a block in the middle: keys on both sides, as in the dual cache
        kv = torch.zeros(B, cfg.n_kv_heads, S, cfg.head_dim, dtype=next(model.parameters()).dtype, device=dev)
        args = (ids, torch.ones(B, S, dtype=torch.long, device=dev), torch.tensor(start, device=dev),
                *[kv.clone() for _ in range(2 * cfg.n_layers)])
        shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, None,
                  tuple({0: batch, 2: total} for _ in range(2 * cfg.n_layers)))  # *past: one varargs tuple
        pin, pout = past_names(cfg.n_layers)
        names, outputs = ["input_ids", "attention_mask", "start", *pin], ["logits", *pout]
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notes
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's FutureWarnings/axis-name notes are noise here
        try:
            program = torch.onnx.export(
                graph.eval(), args, dynamo=True, opset_version=opset, input_names=names,
                output_names=outputs, dynamic_shapes=shapes, verbose=False)
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed for {path.name}: {type(e).__name__}: {e}") from e
        fused = _fuse_normalisations(program.model) if fuse else {}
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=external)
    return external, fused


def _fuse_normalisations(model) -> dict[str, int]:
    """RMSNorm -> SimplifiedLayerNormalization, residual add + RMSNorm -> SkipSimplifiedLayerNormalization
    (ONNX Runtime's kernels, CPU and CUDA), in place on the exporter's onnx_ir model -> count by kind.
    Only these two of onnxscript's ONNX Runtime fusions: its attention ones may produce causal ops."""
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    counts = {"rms_norm": fuse_rms_normalization(model), "add_rms_norm": fuse_skip_rms_normalization(model)}
    optimize(model)  # drop what the fused nodes replaced
    return counts


def _versions() -> dict:
    import onnx
    import onnxruntime
    return dict(torch=torch.__version__, onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)


# ---------------------------------------------------------------- parity

def check_parity(loaded, folder: str | os.PathLike, *, device: str = "cpu", seed: int = 0,
                 progress: Progress | None = None, write: bool = True) -> dict:
    """Run PyTorch and ONNX Runtime on the same random inputs and compare the logits.

    Cases: batch 1 and 2, short and long, with left padding in the batch of 2; and, when the folder
    has the K/V-cache graph, a full pass returning the cache, a prefix-cache step and a dual-cache
    step. Records max |Δlogits| (absolute and relative to max |logits|) and argmax agreement; raises
    ExportError past the dtype's tolerance (after writing parity.json, so the figures can be read).
    """
    from llada_app.backends import OnnxDenoiser, TorchDenoiser

    progress = progress or (lambda f, msg: None)
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    dtype = manifest["dtype"]
    tol = TOLERANCES[dtype]
    model = _model_for_export(loaded.model, DTYPES[dtype], torch.device(device))
    ref = TorchDenoiser(model)
    onnx = OnnxDenoiser(folder, device=device, expect_config=model.config, tokenizer=loaded.tokenizer)
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    long = min(cfg.max_sequence_length, 160)
    short = min(cfg.max_sequence_length, 17)
    cases = [("batch 1, seq 2", 1, 2, 0), (f"batch 1, seq {short}", 1, short, 0),
             (f"batch 2, seq {short}, padded", 2, short, short // 3),
             (f"batch 2, seq {long}, padded", 2, long, long // 4)]
    pad = loaded.ids.pad
    results = []
    total = len(cases) + (3 if onnx.supports_cache else 0)
    for n, (label, B, T, n_pad) in enumerate(cases):
        progress(n / total, f"parity: {label}")
        ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
        mask = torch.ones(B, T, dtype=torch.long)
        if n_pad:
            ids[1, :n_pad], mask[1, :n_pad] = pad, 0  # left padding on the second row
        ids, mask = ids.to(ref.device), mask.to(ref.device)
        want = ref(ids, mask).logits
        got = onnx(ids.to(onnx.device), mask.to(onnx.device)).logits
        results.append(dict(case=label, graph="model", **_compare(want, got, tol)))
    if onnx.supports_cache:
        results += _cache_cases(ref, onnx, cfg, gen, tol, pad, long, lambda i, msg: progress(
            (len(cases) + i) / total, msg))
    report = dict(source=loaded.name, fingerprint=manifest["fingerprint"], dtype=dtype, device=device,
                  providers=onnx.providers, tolerance=asdict(tol), cases=results,
                  max_abs_diff=max(r["max_abs_diff"] for r in results),
                  min_argmax_agreement=min(r["argmax_agreement"] for r in results),
                  passed=all(r["passed"] for r in results))
    if write:
        (folder / PARITY_FILE).write_text(json.dumps(report, indent=2) + "\n")
    progress(1.0, "parity: " + ("passed" if report["passed"] else "FAILED"))
    if not report["passed"]:
        bad = [r for r in results if not r["passed"]]
        raise ExportError(
            f"ONNX Runtime disagrees with PyTorch past the {dtype} tolerance (rel {tol.rel}, argmax "
            f"{tol.argmax}) in {len(bad)} case(s): " + "; ".join(
                f"{r['case']}: max|Δ| {r['max_abs_diff']:.3g} (rel {r['rel_diff']:.3g}), argmax "
                f"{r['argmax_agreement']:.3f}" for r in bad) + f". Figures in {folder / PARITY_FILE}")
    return report


def _cache_cases(ref, onnx, cfg, gen, tol, pad, L, progress) -> list[dict]:
    """Full pass with use_cache, then a prefix-cache and a dual-cache step over a middle block."""
    B, blk = 2, max(2, min(32, L // 4))
    start = L // 2
    ids = torch.randint(0, cfg.vocab_size, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    ids[1, :L // 4], mask[1, :L // 4] = pad, 0
    ids, mask = ids.to(ref.device), mask.to(ref.device)
    out = []
    progress(0, "parity: full pass with cache")
    want, got = ref(ids, mask, use_cache=True), onnx(ids.to(onnx.device), mask.to(onnx.device), use_cache=True)
    k_diff = max((w[0].float() - g[0].to(w[0]).float()).abs().max().item()
                 for w, g in zip(want.past_key_values, got.past_key_values))
    out.append(dict(case=f"full pass with cache, seq {L}", graph="model_with_past",
                    max_key_diff=k_diff, **_compare(want.logits, got.logits, tol)))
    progress(1, "parity: prefix-cache step")
    prefix = tuple((k[:, :, :start], v[:, :, :start]) for k, v in want.past_key_values)
    w = ref(ids[:, start:], mask, past_key_values=prefix, use_cache=True, start=start)
    onnx_prefix = tuple((k.to(onnx.device), v.to(onnx.device)) for k, v in prefix)
    g = onnx(ids[:, start:].to(onnx.device), mask.to(onnx.device), past_key_values=onnx_prefix,
             use_cache=True, start=start)
    out.append(dict(case=f"prefix cache, start {start}", graph="model_with_past", **_compare(w.logits, g.logits, tol)))
    progress(2, "parity: dual-cache step")
    onnx_full = tuple((k.to(onnx.device), v.to(onnx.device)) for k, v in want.past_key_values)
    w = ref(ids[:, start:start + blk], mask, past_key_values=want.past_key_values, start=start)
    g = onnx(ids[:, start:start + blk].to(onnx.device), mask.to(onnx.device), past_key_values=onnx_full,
             start=start)
    out.append(dict(case=f"dual cache, block {start}..{start + blk}", graph="model_with_past",
                    **_compare(w.logits, g.logits, tol)))
    return out


def _compare(want: torch.Tensor, got: torch.Tensor, tol: Tolerance) -> dict:
    want, got = want.float().cpu(), got.float().cpu()
    if want.shape != got.shape:
        return dict(shape=list(want.shape), max_abs_diff=float("inf"), rel_diff=float("inf"),
                    argmax_agreement=0.0, passed=False, error=f"shape {list(got.shape)}")
    diff = (want - got).abs().max().item()
    rel = diff / max(want.abs().max().item(), 1e-6)
    agree = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    return dict(shape=list(want.shape), max_abs_diff=diff, rel_diff=rel, argmax_agreement=agree,
                passed=rel <= tol.rel and agree >= tol.argmax)


# ---------------------------------------------------------------- cache folder

def cache_folder(loaded, dtype: str = "fp32", root: str | os.PathLike | None = None) -> Path:
    """Where the export of this model (by weight fingerprint) in this dtype lives in the cache."""
    root = Path(root) if root else CACHE_ROOT
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in loaded.name) or "model"
    return root / f"{name}-{loaded.fingerprint}-{dtype}"


def cached_export(loaded, *, dtype: str = "fp32", device: str = "cpu", root: str | os.PathLike | None = None,
                  check: bool = True, with_past: bool | None = None, progress: Progress | None = None) -> Path:
    """Export once into the cache folder (with the parity check) and reuse it on later calls.

    with_past None: the K/V-cache graph too, unless the weights need an external data file — each
    graph carries its own copy of the weights, so for large models it would double the disk used.
    """
    if with_past is None:
        weight_bytes = sum(p.numel() for p in loaded.model.parameters()) * DTYPES[dtype].itemsize
        with_past = weight_bytes <= EXTERNAL_DATA_BYTES
    folder = cache_folder(loaded, dtype, root)
    if (folder / MANIFEST_FILE).is_file() and (folder / MODEL_FILE).is_file():
        return folder
    progress = progress or (lambda f, msg: None)
    # Export and check under a side name, then rename: a folder under the final name has passed.
    partial = folder.with_name(folder.name + ".partial")
    export_onnx(loaded, partial, dtype=dtype, device=device, with_past=with_past,
                progress=lambda f, msg: progress(0.7 * f if check else f, msg))
    try:
        if check:
            check_parity(loaded, partial, device=device, progress=lambda f, msg: progress(0.7 + 0.3 * f, msg))
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # a failed check leaves nothing to reuse
    return folder


def onnx_denoiser(loaded, *, onnx_dir=None, dtype: str | None = None, cache_root=None, progress: Progress | None = None):
    """The ONNX Runtime denoiser of `--backend onnx [--onnx DIR]`: with no folder, the model is exported
    once (parity-checked, with progress) into the cache folder
    ~/.cache/llada-studio/onnx/<name>-<weights fingerprint>-<dtype> and reused after. Any folder is
    checked against the loaded model (shapes, tokenizer, weight fingerprint)."""
    from llada_app.backends import OnnxBackendError, OnnxDenoiser

    device = loaded.device
    dtype = dtype or ("fp16" if device.type == "cuda" else "fp32")

    def open_folder(folder):
        return OnnxDenoiser(folder, device=device, expect_config=loaded.model.config, tokenizer=loaded.tokenizer,
                            fingerprint=loaded.fingerprint)

    if onnx_dir is not None:
        try:
            return open_folder(onnx_dir)
        except OnnxBackendError as e:
            raise OnnxBackendError(f"{e}. To make a fresh export of this model: python -m export --model "
                                   f"{loaded.folder or loaded.name} --out NEW_FOLDER") from None
    folder = cached_export(loaded, dtype=dtype, device=device.type, root=cache_root, progress=progress)
    try:
        return open_folder(folder)
    except OnnxBackendError as e:  # the cache is ours: a broken entry (a disk error, an edit) is made again
        logging.getLogger(__name__).warning("the cached export %s is unusable (%s); exporting again", folder, e)
        shutil.rmtree(folder, ignore_errors=True)
        return open_folder(cached_export(loaded, dtype=dtype, device=device.type, root=cache_root,
                                         progress=progress))
