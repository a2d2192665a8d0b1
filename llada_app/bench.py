"""Benchmark of the decoding modes of the one sampler, plus the autoregressive twin.

    python -m llada_app.bench                    # the bundled model, CPU, gen length 128
    python -m llada_app.bench --shape 8b --device cuda --dtype bf16 --gen-length 256
    python -m llada_app.bench --shape 8b --device cuda --no-arm --prompts 1 --prompt-length 64 --gen-length 256 \
        --modes vanilla threshold+dual --compile --kernels --onnx-layers 4 --repeats 3 --json   # every GPU figure
    python -m llada_app.bench --backend onnx --json

For each mode (vanilla with steps = gen length, threshold, prefix cache, dual cache, threshold +
prefix, threshold + dual; with --lengths, the page's length search on vanilla's schedule) it decodes the
same chat prompts and reports the forward passes (NFE), the wall time (median of --repeats after a
warm-up), tokens/s (answer slots decoded per second), the speed-up over vanilla, how often the
output agrees with vanilla's, the poem task accuracy when the prompts have known answers, and the
sampler's own overhead (wall time minus the time spent inside the denoiser). The ARM row decodes
the same prompts greedily with its K/V cache; it stops at EOS/EoT, so compare its seconds per
answer rather than its tokens/s.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .generation import GenerationConfig, format_lengths, generate_answers, pad_prompts, parse_lengths
from .loading import DEFAULT_ARM, DEFAULT_MODEL, LoadedModel, ModelCard
from .modeling import SHAPES
from .poems import LIKELIHOOD_SAMPLES, Decoding, chat_steps
from .tokenization import answer_tokens, chat_prompt_ids, decode_answer

GENERIC_QUESTIONS = [
    "What is the next line after \"From fairest creatures we desire increase,\"?",
    "What is the line before \"That thereby beauty's rose might never die,\"?",
    "Write one line of a sonnet about time.",
    "What is the next line after \"When forty winters shall besiege thy brow,\"?",
]


@dataclass
class Prompt:
    question: str
    expected: str | None = None  # the correct answer, when the question comes from the poem corpus
    given: str | None = None  # the line the question asks about (poem prompts)


@dataclass
class Row:
    mode: str
    nfe: float  # forward passes per batch (mean over batches)
    wall_s: float  # all prompts, median of the repeats
    s_per_answer: float
    tok_s: float  # answer slots decoded per second (ARM: tokens generated before stopping)
    speedup: float | None = None  # tok_s / vanilla's tok_s (ARM: vanilla's s_per_answer / its own)
    agree_tokens: float | None = None  # fraction of answer slots equal to vanilla's
    agree_answers: float | None = None  # fraction of answers (text up to EOS) equal to vanilla's
    accuracy: float | None = None  # exact match with the expected answer (poem prompts)
    cpu_s: float = 0.0  # process CPU time of the same run (robust to other processes on a shared machine)
    speedup_cpu: float | None = None  # vanilla's cpu_s / its own (same work, so comparable for all rows)
    denoiser_s: float | None = 0.0  # time inside the denoiser (same run as wall_s; None on a GPU: not timed)
    ms_per_forward: float | None = 0.0  # denoiser_s per forward pass (vanilla: a full pass; dual: mostly block passes)
    overhead_pct: float | None = 0.0  # 100 * (wall - denoiser) / wall
    config: dict = field(default_factory=dict)


class TimedDenoiser:
    """Wraps a denoiser, counting its calls and adding up the seconds spent inside it. On a GPU that time
    would need a sync around every call, which is itself the cost being measured: there it is not taken
    (`seconds` stays NaN) and only the wall time counts."""

    def __init__(self, inner):
        self.inner, self.seconds, self.calls = inner, 0.0, 0
        for attr in ("name", "device", "supports_cache", "max_length", "causal", "deferred_sync"):
            setattr(self, attr, getattr(inner, attr))
        self.timed = torch.device(self.device).type == "cpu"

    def __call__(self, *args, **kw):
        t = time.perf_counter()
        out = self.inner(*args, **kw)
        self.seconds += (time.perf_counter() - t) if self.timed else float("nan")
        self.calls += 1
        return out


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make_denoiser(loaded: LoadedModel, backend: str = "torch", onnx_dir: str | None = None,
                  compiled: bool = False):
    """The denoiser for `--backend torch|onnx` (ONNX: export.onnx_export.onnx_denoiser); `compiled`: the
    captured PyTorch path (llada_app/compiled.py)."""
    if backend == "onnx":
        from export.onnx_export import onnx_denoiser

        return onnx_denoiser(loaded, onnx_dir=onnx_dir)
    from .backends import TorchDenoiser
    from .compiled import CompiledDenoiser

    return CompiledDenoiser(loaded.model) if compiled else TorchDenoiser(loaded.model)


def random_model(shape: str | dict, tokenizer, device: str, dtype: torch.dtype, causal: bool = False,
                 seed: int = 0, **overrides) -> LoadedModel:
    """A random-weight LLaDA of a named shape (modeling.SHAPES) or a shape dict, with `overrides`
    (n_layers=4, say), built directly on `device` in `dtype`."""
    from .modeling import LLaDAConfig, LLaDAModelLM

    if isinstance(shape, str) and shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; use one of {sorted(SHAPES)}")
    kw = dict(SHAPES[shape] if isinstance(shape, str) else shape, **overrides)
    kw["vocab_size"] = max(kw["vocab_size"], len(tokenizer))
    config = LLaDAConfig(**kw, embedding_size=kw["vocab_size"], causal=causal,
                         mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the target dtype: an 8B model never exists in fp32
    try:
        with torch.device(device):
            model = LLaDAModelLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    name = f"random-{shape if isinstance(shape, str) else 'shape'}" + ("-causal" if causal else "")
    name += "".join(f"-{k}{v}" for k, v in overrides.items())
    return LoadedModel(model, tokenizer, ModelCard.build(name, tokenizer, config))


def bench_tokenizer(model_dir: str | None):
    """The bundled model's tokenizer if there is one, else a BPE trained on the sonnets in a second."""
    from transformers import AutoTokenizer

    from .tokenization import train_bpe_tokenizer

    for folder in (model_dir, DEFAULT_MODEL):
        if folder and Path(folder, "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(folder)
    try:
        from .data import SONNETS_FILE
        lines = [ln for ln in Path(SONNETS_FILE).read_text().splitlines() if ln.strip()]
    except (ImportError, OSError):
        lines = GENERIC_QUESTIONS
    return train_bpe_tokenizer(lines + GENERIC_QUESTIONS, vocab_size=1024)


def poem_prompts(n: int, card: ModelCard, split: str = "heldout") -> list[Prompt]:
    """n questions on lines of the split's sonnets, alternately next/previous, with their answers."""
    from .data import question
    from .poems import PoemCorpus, line_pairs

    try:
        corpus = PoemCorpus.for_card(card)
    except (OSError, ValueError):
        return [Prompt(GENERIC_QUESTIONS[i % len(GENERIC_QUESTIONS)]) for i in range(n)]
    pairs = line_pairs(corpus.split(split) or corpus.sonnets)
    stride = max(1, len(pairs) // n)
    out = []
    for k in range(n):
        a, b = pairs[(k * stride) % len(pairs)]
        out.append(Prompt(question(a, "next"), b, a) if k % 2 == 0 else Prompt(question(b, "previous"), a, b))
    return out


def mode_configs(gen_length: int, block_length: int, threshold: float) -> dict[str, GenerationConfig]:
    base = GenerationConfig(gen_length=gen_length, block_length=block_length, steps=gen_length)
    return {
        "vanilla": base,
        "threshold": replace(base, threshold=threshold),
        "prefix": replace(base, cache="prefix"),
        "dual": replace(base, cache="dual"),
        "threshold+prefix": replace(base, threshold=threshold, cache="prefix"),
        "threshold+dual": replace(base, threshold=threshold, cache="dual"),
    }


def _answers(tokenizer, ids, rows: torch.Tensor) -> tuple[list[list[int]], list[str]]:
    """Answer slots [B, G] -> token lists cut at the first EOS/EoT, and their text."""
    toks = [answer_tokens(row, ids) for row in rows.tolist()]
    return toks, [decode_answer(tokenizer, t, ids) for t in toks]


def _accuracy(texts: list[str], prompts: list[Prompt]) -> float | None:
    if any(p.expected is None for p in prompts):
        return None
    from .poems import normalise
    return sum(normalise(t) == normalise(p.expected) for t, p in zip(texts, prompts)) / len(prompts)


@dataclass
class Job:
    """One row of the table: a denoiser, its prompt batches and a config (None: autoregressive)."""

    name: str
    denoiser: TimedDenoiser
    batches: list  # [(ids [B, P], attention mask [B, P] | None)]
    config: GenerationConfig | None
    ids: object  # SpecialIds of the job's model
    search: Decoding | None = None  # a length search as the page runs it (poems.chat_steps): lengths, re-scoring
    tokenizer: object = None  # the length search's: it reads the answers of poem questions
    given: list | None = None  # the length search: per batch, the lines its questions ask about (None: not poems)
    runs: list = field(default_factory=list)  # (wall s, cpu s, denoiser s, nfe per batch) per timed run
    outs: list = field(default_factory=list)  # answer slots per batch, from the last run

    def run(self, max_new_tokens: int) -> tuple[float, float, float, float]:
        den, ids = self.denoiser, self.ids
        den.seconds, den.calls, outs = 0.0, 0, []
        _sync(den.device)
        t, c = time.perf_counter(), time.process_time()
        for k, (prompt, attn) in enumerate(self.batches):
            if self.search:
                given = None if self.given is None else self.given[k]
                for final in chat_steps(den, self.tokenizer, ids, prompt, attn, self.config, self.search, given):
                    pass
                seq = final.ids
            else:
                seq = generate_answers(den, prompt, attn, ids, config=self.config, max_new_tokens=max_new_tokens)
            outs.append(seq[:, prompt.shape[1]:])
        _sync(den.device)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        outs = [o.cpu() for o in outs]
        self.outs = outs
        return wall, cpu, den.seconds, den.calls / len(self.batches)

    def median_run(self) -> tuple[float, float, float, float]:
        """The run with the median wall time (its own CPU and denoiser times with it)."""
        return sorted(self.runs)[len(self.runs) // 2]


def measure(jobs: list[Job], repeats: int, warmup: int, max_new_tokens: int, progress: bool) -> None:
    """Warm up every job, then time them round-robin so that load from other processes on a shared
    machine is spread over all the rows alike."""
    from tqdm import tqdm

    total = len(jobs) * (warmup + repeats)
    with tqdm(total=total, desc="bench", disable=not progress) as bar:
        for job in jobs:
            for _ in range(warmup):
                job.run(max_new_tokens)
                bar.update()
        for _ in range(repeats):
            for job in jobs:
                job.runs.append(job.run(max_new_tokens))
                bar.update()


def run_bench(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    from .loading import load_model, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.shape:
        tokenizer = bench_tokenizer(args.model)
        loaded = random_model(args.shape, tokenizer, str(device), dtype)
    else:
        model_dir = args.model or DEFAULT_MODEL
        if not Path(model_dir).exists() and args.model is None:
            raise SystemExit(f"the bundled model {DEFAULT_MODEL} is not there yet: pass --model DIR or --shape sonnets")
        loaded = load_model(model_dir, device=str(device), dtype=dtype)
    denoiser = TimedDenoiser(make_denoiser(loaded, args.backend, args.onnx))
    captured = TimedDenoiser(make_denoiser(loaded, compiled=True)) if args.compile else None

    # ARM twin: --arm DIR, else the bundled one next to a bundled model, else a random causal twin
    arm = None
    if not args.no_arm:
        arm_dir = args.arm or (DEFAULT_ARM if not args.shape and Path(DEFAULT_ARM).exists() else None)
        if arm_dir:
            arm_loaded = load_model(arm_dir, device=str(device), dtype=dtype)
        elif args.shape:
            arm_loaded = random_model(args.shape, loaded.tokenizer, str(device), dtype, causal=True)
        else:
            arm_loaded = None
        if arm_loaded is not None:
            arm = (TimedDenoiser(make_denoiser(arm_loaded, args.backend, args.arm_onnx)), arm_loaded)

    prompts = poem_prompts(args.prompts, loaded.card, args.split)
    if args.shape:  # random weights: known answers mean nothing
        prompts = [Prompt(p.question) for p in prompts]

    def batches_for(lm: LoadedModel):
        ids_ = [chat_prompt_ids(lm.tokenizer, [{"role": "user", "content": p.question}]) for p in prompts]
        if args.prompt_length:  # exactly this many tokens: the questions cut or repeated
            ids_ = [(q * (args.prompt_length // len(q) + 1))[-args.prompt_length:] for q in ids_]
        out = []
        for k in range(0, len(ids_), args.batch_size):
            x, attn = pad_prompts(ids_[k:k + args.batch_size], lm.ids.pad)
            out.append((x.to(device), None if attn is None else attn.to(device)))
        return out

    n, G = len(prompts), args.gen_length
    configs = mode_configs(G, args.block_length, args.threshold)
    modes = args.modes or list(configs)
    unknown = [m for m in modes if m not in configs]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {list(configs)}")
    if "vanilla" not in modes:
        modes = ["vanilla"] + modes  # the reference every other row is compared with
    batches = batches_for(loaded)
    jobs, skipped = [], []
    for mode in modes:
        if configs[mode].cache != "none" and not denoiser.supports_cache:
            skipped.append(mode)
        else:
            jobs.append(Job(mode, denoiser, batches, configs[mode], loaded.ids))
    if captured is not None:  # the same modes through the captured path (its block step: dual cache)
        jobs += [Job(f"compiled {mode}", captured, batches, configs[mode], loaded.ids)
                 for mode in modes if configs[mode].cache != "prefix"]
    if args.lengths:
        given = None if any(p.given is None for p in prompts) else [
            [p.given for p in prompts[k:k + args.batch_size]] for k in range(0, n, args.batch_size)]
        jobs.append(Job("length-search", denoiser, batches, configs["vanilla"], loaded.ids,
                        search=Decoding(lengths=args.lengths, likelihood_samples=args.likelihood_samples),
                        tokenizer=loaded.tokenizer, given=given))
    if arm:
        jobs.append(Job("arm (KV cache)", arm[0], batches_for(arm[1]), None, arm[1].ids))
    measure(jobs, args.repeats, args.warmup, G, progress=not args.json and sys.stderr.isatty())

    rows: list[Row] = []
    for job in jobs:
        wall, cpu, den, nfe = job.median_run()
        tokenizer = loaded.tokenizer if job.config else arm[1].tokenizer
        slots = torch.cat([F.pad(o, (0, G - o.shape[1]), value=job.ids.eos) for o in job.outs])  # [N, G]
        toks, texts = _answers(tokenizer, job.ids, slots)
        if job.name == "vanilla":
            vanilla_slots, vanilla_toks, vanilla_texts = slots, toks, texts
        if job.config is None:  # ARM: tokens it produced, up to and including the stop token
            produced = sum(min(len(t) + 1, G) for t in toks)
            extra = dict(agree_answers=sum(a == b for a, b in zip(texts, vanilla_texts)) / n,
                         config=dict(max_new_tokens=G, model=arm[1].name))
        else:
            produced = n * G
            extra = dict(agree_tokens=float((slots == vanilla_slots).float().mean()),
                         agree_answers=sum(a == b for a, b in zip(toks, vanilla_toks)) / n,
                         config={k: v for k, v in asdict(job.config).items() if v not in (None, False)})
            if job.search:
                extra["config"].update(lengths=format_lengths(job.search.lengths),
                                       likelihood_samples=job.search.likelihood_samples)
        rows.append(Row(job.name, nfe, wall, wall / n, produced / wall, cpu_s=cpu, accuracy=_accuracy(texts, prompts),
                        **(dict(denoiser_s=den, ms_per_forward=1e3 * den / (nfe * len(job.batches)),
                                overhead_pct=100 * (wall - den) / wall) if den == den else  # NaN: not timed (GPU)
                           dict(denoiser_s=None, ms_per_forward=None, overhead_pct=None)), **extra))
    base = rows[0]
    for r in rows:
        if r.mode.startswith("arm"):
            r.speedup = base.s_per_answer / r.s_per_answer
        else:
            r.speedup = r.tok_s / base.tok_s
        r.speedup_cpu = base.cpu_s / r.cpu_s
    for mode in skipped:
        rows.append(Row(mode, float("nan"), float("nan"), float("nan"), float("nan"),
                        config=dict(skipped=f"the {denoiser.name} denoiser has no K/V cache support")))
    samples = [dict(question=p.question, expected=p.expected, vanilla=t) for p, t in zip(prompts[:3], vanilla_texts)]
    kernels = kernel_rows(loaded, args) if args.kernels else []
    return dict(kernels=kernels, compile_s=captured.inner.compile_s if captured else None, model=loaded.name, arm=arm[1].name if arm else None, backend=denoiser.name, device=str(device),
                split=None if args.shape else args.split,
                dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads(), prompts=n,
                batch_size=args.batch_size, prompt_length=args.prompt_length, gen_length=args.gen_length, block_length=args.block_length,
                threshold=args.threshold, repeats=args.repeats, rows=[asdict(r) for r in rows], samples=samples)


def kernel_rows(loaded: LoadedModel, args) -> list[dict]:
    """Single forward passes as the sampler makes them, eager against compiled, batch 1, median ms of
    --kernel-runs after a warm-up call (the compile itself happens in it):

      - the full forward over --kernel-length positions, the LM head on one block (what starts a block);
      - the dual-cache block step: --block-length queries against prompt + gen length keys;
      - with --onnx-layers N: the full forward of a random model of the same width with N layers, ONNX
        Runtime (fp16 with CUDA, IO binding; fp32 on a CPU) against compiled PyTorch on the same model.
    """
    from export.bench import alternate

    from .backends import TorchDenoiser
    from .compiled import CompiledDenoiser

    device, Lb = loaded.device, args.block_length
    L = min(args.kernel_length, loaded.model.config.max_sequence_length)
    S = min((args.prompt_length or 64) + args.gen_length, loaded.model.config.max_sequence_length)
    V = loaded.model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(0, V - 8, (1, n), generator=gen).to(device)

    def calls(denoiser):
        x, xs = ids(L), ids(S)
        past = denoiser(xs, use_cache=True, logits_slice=slice(S - Lb, S)).past_key_values
        return {f"full forward L={L}": lambda: denoiser(x, use_cache=True, logits_slice=slice(L - Lb, L)),
                f"dual block step {Lb}x{S}": lambda: denoiser(xs[:, S - Lb:], past_key_values=past, start=S - Lb)}

    eager, compiled = calls(TorchDenoiser(loaded.model)), calls(CompiledDenoiser(loaded.model))
    rows = []
    for name in eager:
        ms = alternate({"eager": eager[name], "compiled": compiled[name]}, args.kernel_runs, device.type == "cuda")
        rows.append(dict(kernel=name, eager_ms=ms["eager"], compiled_ms=ms["compiled"],
                         speedup=ms["eager"] / ms["compiled"]))
    if args.onnx_layers:
        rows.append(_onnx_kernel(loaded, args, L, ids(L)))
    return rows


def _onnx_kernel(loaded: LoadedModel, args, L: int, x: torch.Tensor) -> dict:
    import tempfile

    from export.bench import alternate
    from export.onnx_export import export_onnx

    from .backends import OnnxDenoiser
    from .compiled import CompiledDenoiser

    device = loaded.device
    cuda = device.type == "cuda"
    cfg = loaded.model.config
    shape = {k: getattr(cfg, k) for k in SHAPES["8b"]}  # the loaded model's width, context and vocabulary
    small = random_model(shape, loaded.tokenizer, str(device), loaded.model.dtype, n_layers=args.onnx_layers)
    dtype = "fp16" if cuda else "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        folder = export_onnx(small, Path(tmp) / "onnx", dtype=dtype, device=device.type, with_past=False)
        export_s = time.perf_counter() - t
        ort = OnnxDenoiser(folder, device=device, expect_config=small.model.config)
        ours = CompiledDenoiser(small.model)
        Lb = args.block_length
        ms = alternate({"compiled": lambda: ours(x, logits_slice=slice(L - Lb, L)),
                        "onnx": lambda: ort(x, logits_slice=slice(L - Lb, L))}, args.kernel_runs, cuda)
    return dict(kernel=f"full forward L={L}, {args.onnx_layers} layers: ORT {dtype} vs compiled torch",
                eager_ms=None, compiled_ms=ms["compiled"], onnx_ms=ms["onnx"], onnx_vs_compiled=ms["onnx"] / ms["compiled"],
                export_s=export_s, providers=ort.providers)


def format_table(result: dict) -> str:
    def f(v, spec):
        return "-" if v is None or v != v else format(v, spec)

    lines = [f"model {result['model']} | backend {result['backend']} | {result['device']} {result['dtype']} | "
             f"{result['threads']} threads | {result['prompts']} prompts, batch {result['batch_size']} | "
             f"gen {result['gen_length']}, block {result['block_length']}, tau {result['threshold']} | "
             f"median of {result['repeats']}",
             "| mode | NFE/batch | wall s | s/answer | tok/s | speed-up | CPU s | CPU speed-up | agree tok "
             "| agree ans | accuracy | ms/forward | sampler overhead |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {f(r['nfe'], '.1f')} | {f(r['wall_s'], '.3f')} | {f(r['s_per_answer'], '.3f')} | "
                     f"{f(r['tok_s'], '.1f')} | {f(r['speedup'], '.2f')}x | {f(r['cpu_s'], '.3f')} | "
                     f"{f(r['speedup_cpu'], '.2f')}x | {f(r['agree_tokens'], '.3f')} | {f(r['agree_answers'], '.3f')} | "
                     f"{f(r['accuracy'], '.3f')} | {f(r['ms_per_forward'], '.2f')} | {f(r['overhead_pct'], '.1f')}% |")
    if result.get("compile_s") is not None:
        lines.append(f"compiled rows: {result['compile_s']:.1f} s spent compiling (in their warm-up)")
    if result.get("kernels"):
        lines += ["", "| forward pass (batch 1) | eager ms | compiled ms | eager / compiled | ONNX Runtime ms | ORT / compiled |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for k in result["kernels"]:
            lines.append(f"| {k['kernel']} | {f(k.get('eager_ms'), '.2f')} | {f(k['compiled_ms'], '.2f')} | "
                         f"{f(k.get('speedup'), '.2f')} | {f(k.get('onnx_ms'), '.2f')} | {f(k.get('onnx_vs_compiled'), '.2f')} |")
    return "\n".join(lines)


def _lengths(text: str) -> range:
    try:
        return parse_lengths(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m llada_app.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help=f"model folder or hub id (default: the bundled {DEFAULT_MODEL})")
    p.add_argument("--shape", choices=sorted(SHAPES), help="benchmark a random-weight model of this shape instead")
    p.add_argument("--arm", help=f"autoregressive twin folder (default: {DEFAULT_ARM} when present; "
                                 "with --shape, a random causal model of the same shape)")
    p.add_argument("--no-arm", action="store_true", help="skip the autoregressive row")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    p.add_argument("--onnx", help="existing ONNX export folder of the model (backend onnx)")
    p.add_argument("--arm-onnx", help="existing ONNX export folder of the ARM twin (backend onnx)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--gen-length", type=int, default=128)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.9, help="tau of the threshold modes")
    p.add_argument("--modes", nargs="+", help="subset of modes (vanilla is always run: it is the reference)")
    p.add_argument("--lengths", type=_lengths, metavar="MIN:MAX",
                   help="also a length search over these answer lengths in tokens (vanilla's schedule), kept "
                        "as the page keeps it: confidence + the likelihood of the answer")
    p.add_argument("--likelihood-samples", type=int, default=LIKELIHOOD_SAMPLES,
                   help="samples of the length search's likelihood re-scoring (0: keep by confidence alone)")
    p.add_argument("--prompts", type=int, default=8, help="number of chat prompts")
    p.add_argument("--split", choices=["heldout", "train"], default="heldout",
                   help="sonnets the poem questions are drawn from (heldout: kept out of SFT)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per mode first")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--prompt-length", type=int, default=None,
                   help="cut or repeat every prompt to exactly this many tokens (default: the questions as they are)")
    p.add_argument("--compile", action="store_true",
                   help="also run the modes through the captured path (torch.compile at static shapes; CUDA "
                        "graphs on a GPU), checked against eager vanilla like every row")
    p.add_argument("--kernels", action="store_true",
                   help="also time single forward passes, eager vs compiled (and ONNX Runtime, see --onnx-layers)")
    p.add_argument("--kernel-length", type=int, default=1024, help="sequence length of the full-forward timing")
    p.add_argument("--kernel-runs", type=int, default=20, help="timed calls per forward pass (median reported)")
    p.add_argument("--onnx-layers", type=int, default=0,
                   help="with --kernels: export a random model of the same width with this many layers and time "
                        "ONNX Runtime against compiled PyTorch on it (0: skip)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.prompts < 1 or args.batch_size < 1 or args.likelihood_samples < 0:
        raise SystemExit("--repeats, --prompts and --batch-size must be >= 1, --warmup and --likelihood-samples >= 0")
    from .backends import OnnxBackendError
    from .loading import ModelLoadError

    try:
        for config in mode_configs(args.gen_length, args.block_length, args.threshold).values():
            config.validate(10 ** 9, 1)  # the settings alone; the model's context is checked when it runs
        result = run_bench(args)
    except (ValueError, ModelLoadError, OnnxBackendError) as e:  # settings, a model folder, an export
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(result, indent=2) if args.json else format_table(result))


if __name__ == "__main__":
    main()
