"""python -m export.bench: PyTorch eager vs ONNX Runtime, per forward and per full generation.

Same model, same inputs, same thread count; each figure is the median of --runs timed runs after a
warm-up, with the two back ends measured in alternation so that load from other processes hits both
alike. The ratio is PyTorch time / ONNX Runtime time (> 1: ONNX Runtime is faster).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from llada_app.modeling import SHAPES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.bench", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="model folder or hub id (default: the bundled model if present, else --shape)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="sonnets",
                   help="random-weight model shape used when no --model is given and none is bundled")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: ORT CPU EP vs torch on CPU; cuda: ORT CUDA EP with IO binding vs torch on the GPU")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default=None,
                   help="dtype of the ONNX graph (default: fp32 on cpu, fp16 on cuda)")
    p.add_argument("--torch-dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="dtype of the PyTorch model (default: fp32 on cpu, bf16 on cuda)")
    p.add_argument("--onnx", default=None, help="existing export folder (default: export into a temp folder)")
    p.add_argument("--seq", default="64,160", help="comma-separated sequence lengths for the forward timing")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=20, help="timed forwards per setting (median reported)")
    p.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts (both back ends)")
    p.add_argument("--opt", default="all,extended,basic",
                   help="ONNX Runtime graph optimisation levels to try (all, extended, basic, disable)")
    p.add_argument("--gen-length", type=int, default=32, help="answer length of the full-generation timing")
    p.add_argument("--prompt-length", type=int, default=48)
    p.add_argument("--gen-runs", type=int, default=10, help="timed generations per back end")
    p.add_argument("--no-generate", action="store_true", help="skip the full-generation timing")
    p.add_argument("--no-fuse", action="store_true", help="export without the normalisation fusions")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    return p.parse_args(argv)


def load(args):
    """-> LoadedModel (trained, or random weights of --shape with tokenizer None)."""
    from llada_app.loading import DEFAULT_MODEL, LoadedModel, ModelCard, SpecialIds, load_model, resolve_dtype
    from llada_app.modeling import LLaDAConfig, LLaDAModelLM

    name = args.model or (DEFAULT_MODEL if (Path(DEFAULT_MODEL) / "config.json").is_file() else None)
    if name:
        return load_model(name, device=args.device, dtype=args.torch_dtype)
    shape = SHAPES[args.shape]
    V = shape["vocab_size"]
    ids = SpecialIds(mask=V - 1, eos=V - 2, eot=V - 3, pad=V - 2)
    cfg = LLaDAConfig(**shape, embedding_size=V, mask_token_id=ids.mask,
                      eos_token_id=ids.eos, pad_token_id=ids.pad)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LLaDAModelLM(cfg).to(resolve_dtype(args.torch_dtype, torch.device(args.device))).eval()
    name = f"random-{args.shape}"
    return LoadedModel(model, None, ModelCard(name, ids, causal=False, chat=False, shape=args.shape))


def alternate(fns: dict, runs: int, cuda: bool = False) -> dict:
    """Median ms of each function, measured round-robin (one run of each per round) after a warm-up."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    from llada_app.backends import OnnxDenoiser, TorchDenoiser
    from tqdm import tqdm

    from .onnx_export import export_onnx

    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("fp16" if cuda else "fp32")
    args.torch_dtype = args.torch_dtype or ("bf16" if cuda else "fp32")
    from llada_app.loading import ModelLoadError

    try:
        loaded = load(args)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = loaded.model.config
    seqs = [int(s) for s in args.seq.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    levels = args.opt.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.onnx) if args.onnx else export_onnx(
            loaded, Path(tmp) / "onnx", dtype=args.dtype, device=args.device, with_past=not args.no_generate,
            fuse=not args.no_fuse)
        rows, gens = [], []
        bar = tqdm(total=len(threads) * (len(seqs) + (0 if args.no_generate else 1)), desc="benchmark",
                   disable=args.json, file=sys.stderr)
        for n in threads:
            torch.set_num_threads(n)
            ref = TorchDenoiser(loaded.model)
            sessions = {lv: OnnxDenoiser(folder, device=args.device, expect_config=cfg, threads=n, optimization=lv)
                        for lv in levels}
            for T in seqs:
                gen = torch.Generator().manual_seed(T)
                ids = torch.randint(0, cfg.vocab_size, (args.batch, T), generator=gen).to(args.device)
                fns = {"torch": lambda: ref(ids)}
                fns.update({f"onnx-{lv}": (lambda d=d: d(ids)) for lv, d in sessions.items()})
                ms = alternate(fns, args.runs, cuda)
                for lv in levels:
                    rows.append(dict(threads=n, batch=args.batch, seq=T, opt=lv, torch_ms=ms["torch"],
                                     onnx_ms=ms[f"onnx-{lv}"], ratio=ms["torch"] / ms[f"onnx-{lv}"]))
                bar.update()
            if not args.no_generate:
                best = min(levels, key=lambda lv: statistics.median(
                    r["onnx_ms"] for r in rows if r["opt"] == lv and r["threads"] == n))
                gens += bench_generate(args, loaded, ref, sessions[best], n, best)
                bar.update()
        bar.close()
    report = dict(model=loaded.name, parameters=sum(p.numel() for p in loaded.model.parameters()),
                  device=args.device, onnx_dtype=args.dtype, torch_dtype=args.torch_dtype,
                  d_model=cfg.d_model, n_layers=cfg.n_layers, vocab=cfg.embedding_size,
                  torch=torch.__version__, forward=rows, generate=gens)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


GEN_MODES = {"vanilla": {}, "threshold 0.9 + dual cache": dict(threshold=0.9, cache="dual")}


def bench_generate(args, loaded, ref, onnx, threads: int, level: str) -> list[dict]:
    """Full generations on both back ends from the same prompt: vanilla (one token per step, a single
    block of gen_length) and, when the export has the cache graph, threshold + dual cache."""
    from llada_app.generation import GenerationConfig, generate

    cfg = loaded.model.config
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size - 8, (args.batch, args.prompt_length), generator=gen).to(args.device)
    kw = dict(mask_id=loaded.ids.mask, eos_id=loaded.ids.eos, eot_id=loaded.ids.eot)
    rows = []
    for mode, extra in GEN_MODES.items():
        if extra.get("cache") and not onnx.supports_cache:
            continue
        config = GenerationConfig(gen_length=args.gen_length, block_length=args.gen_length, steps=args.gen_length,
                                  **extra)
        out = {}
        fns = {"torch": lambda: out.__setitem__("torch", generate(ref, prompt, None, config, **kw)),
               "onnx": lambda: out.__setitem__("onnx", generate(onnx, prompt, None, config, **kw))}
        ms = alternate(fns, args.gen_runs, args.device == "cuda")
        rows.append(dict(mode=mode, threads=threads, opt=level, prompt=args.prompt_length,
                         gen_length=args.gen_length, torch_ms=ms["torch"], onnx_ms=ms["onnx"],
                         ratio=ms["torch"] / ms["onnx"],
                         same_tokens=bool(torch.equal(out["torch"], out["onnx"].to(out["torch"].device)))))
    return rows


def print_table(report: dict) -> None:
    print(f"{report['model']}: {report['parameters'] / 1e6:.2f}M parameters, d_model {report['d_model']}, "
          f"{report['n_layers']} layers, vocab {report['vocab']}; {report['device']}, torch {report['torch_dtype']}, "
          f"ONNX {report['onnx_dtype']}, median ms")
    print(f"{'threads':>7} {'batch':>5} {'seq':>5} {'ORT opt':>9} {'torch ms':>9} {'onnx ms':>9} {'speed-up':>9}")
    for r in report["forward"]:
        print(f"{r['threads']:>7} {r['batch']:>5} {r['seq']:>5} {r['opt']:>9} {r['torch_ms']:>9.2f} "
              f"{r['onnx_ms']:>9.2f} {r['ratio']:>8.2f}x")
    for g in report["generate"]:
        print(f"generate {g['mode']} (prompt {g['prompt']}, {g['gen_length']} tokens, {g['threads']} thread(s), "
              f"ORT {g['opt']}): torch {g['torch_ms']:.0f} ms, onnx {g['onnx_ms']:.0f} ms, "
              f"speed-up {g['ratio']:.2f}x, same tokens: {g['same_tokens']}")

if __name__ == "__main__":
    sys.exit(main())
