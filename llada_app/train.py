"""Train a LLaDA model: masked diffusion (`mdm`, the LLaDA recipe) or its autoregressive twin (`arm`).

One run goes through two stages on one learning-rate schedule: `pretrain_steps` of plain sonnet
text (line-aligned windows, reading order), then `sft_steps` of chat conversations about the SFT
sonnets, with a share `replay` of pre-training batches mixed in so the held-out sonnets stay
memorised. `--stage pretrain` / `--stage sft` run one stage only (SFT usually with `--init-from`).
A fresh run refuses a folder that holds another run (`--overwrite`); `--resume` refuses other
settings than the checkpoint's (`--accept-changes`) and falls back to the older of the two kept
checkpoints when the newest does not read back.

Runs plainly (`python -m llada_app.train --preset micro`) or under `accelerate launch` (DDP, FSDP,
DeepSpeed, mixed precision all come from the accelerate config). Every batch is a pure function of
(seed, step, process index), so `--resume` after a kill continues with the same data order, and the
checkpoint holds model + optimizer; checkpoints are written to a temporary folder then renamed.

Output folder: the final model (safetensors, fp16 by default) + tokenizer in the Hugging Face
layout `llada_app.loading.load_model` reads, `training_meta.json`, `metrics.json`, `loss.png`, and
`evaluation.json` (the saved model evaluated as the app's page does, which shows it at once).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import (DEFAULT_N_SONNETS, SONNETS_FILE, load_sonnets, pretraining_window, sft_example, split_corpus,
                   tokenizer_texts)
from .loading import TRAINING_META, LoadedModel, ModelCard, load_model
from .modeling import SHAPES, LLaDAConfig, LLaDAModelLM
from .poems import Decoding, PoemCorpus, evaluate
from .tokenization import EOT, chat_prompt_ids, train_bpe_tokenizer

OBJECTIVES = ("mdm", "arm")
STAGES = ("both", "pretrain", "sft")
T_SAMPLING = ("iid", "stratified")


@dataclass
class TrainConfig:
    output_dir: str = "runs/micro"  # final model, metrics.json, loss.png, checkpoints/
    preset: str | None = None  # the preset that filled the settings not given (recorded in training_meta.json)
    objective: str = "mdm"  # "mdm" (masked diffusion) or "arm" (causal, next-token)
    stage: str = "both"  # "both" (pretrain then sft), "pretrain" only, or "sft" only
    init_from: str | None = None  # a saved model folder to start from (weights + tokenizer)
    freeze: str = ""  # regex: parameters whose name matches stay fixed (e.g. "wte|ff_proj|up_proj")
    # corpus
    sonnets_file: str | None = None  # default: assets/data/sonnets.txt
    n_sonnets: int = DEFAULT_N_SONNETS  # train on the first N sonnets; the last sixth (>= 5) is held out of SFT
    vocab_size: int = 1024  # BPE vocabulary (trained on the corpus + the question phrasings)
    # model
    d_model: int = 256
    n_heads: int = 8
    n_kv_heads: int = 4  # grouped-query attention
    n_layers: int = 4
    mlp_hidden_size: int = 704
    max_sequence_length: int = 256
    rope_theta: float = 10000.0
    # data
    seq_len: int = 128  # pre-training sequence length (packed line windows, EOS-separated)
    max_window_lines: int = 14  # longest pre-training window, in lines
    header_prob: float = 0.3  # chance that a window starting at line 1 is led by "Sonnet N"
    answer_slots: int = 32  # SFT: answer + EOS padding spans at least this many positions (= eval gen length)
    batch_size: int = 32  # sequences per process per step
    pretrain_steps: int = 1000
    sft_steps: int = 500
    replay: float = 0.3  # SFT stage: share of batches that are pre-training text
    # optimisation
    lr: float = 3e-3
    min_lr_ratio: float = 0.05  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta2: float = 0.98
    grad_clip: float = 1.0
    mask_eps: float = 1e-3  # p = (1 - eps) t + eps
    t_sampling: str = "iid"  # MDM noise levels of a batch: "iid" t ~ U(0,1), or "stratified" (one offset, evenly spaced)
    random_length_prob: float = 0.01  # pre-training batches cut to a random length
    line_gap_prob: float = 0.0  # MDM pre-training: share of rows whose noise is one whole line masked, the rest visible
    seed: int = 0
    # run
    threads: int = 0  # torch CPU threads (0: torch's default)
    compile: bool = False  # torch.compile the model for the training steps (first step slower: compiling)
    log_every: int = 10
    save_every: int = 200  # checkpoint period in steps (0: only at the end)
    eval_every: int = 0  # held-out poem eval period in steps (0: off)
    eval_limit: int = 30  # line pairs per direction in the periodic eval
    save_dtype: str = "fp16"  # dtype of the final weights: fp16, bf16 or fp32
    keep_checkpoints: bool = False  # keep checkpoints/ after the final save
    final_eval: bool = True  # evaluate the saved model (as the page does) into evaluation.json
    eval_protocols: str = "completion,chat"  # what the periodic and final evaluations measure (a base model: completion)
    progress: bool = True  # tqdm progress bar

    @property
    def total_steps(self) -> int:
        return self.pretrain_steps + self.sft_steps


# The bundled models (assets/models): the same corpus, chats, tokenizer and model size for both
# objectives (the MDM pair reads 1.4x the twin's tokens: two threads, about an hour in all; README). The MDM
# takes two runs: `sonnets-mdm-base`, pre-training only (the completion protocol runs on it), then
# `sonnets-mdm`, chats with pre-training replay from its weights (the chat protocol). The ARM takes one run
# of small batches with the chats mixed into the pre-training text from step 0. Measured (README): the
# chats cost the MDM's memory of the text (completion 84.6 / 67.7 held-out on a base, 67.7 / 64.6 after
# SFT), each schedule measured worse for the other objective, and the base's 500 warm-up steps (in place
# of 100) leave the loss plateau of the first steps sooner: more recall over three seeds; 9,000 steps in place
# of 6,000 add about 9 points on the held-out previous line, three seeds within 1.6 (next) and 3.0 (previous).
_SHAPE = dict(SHAPES["sonnets"])  # d_model, heads, layers, MLP width, context, RoPE, vocabulary
_BUNDLED = dict(n_sonnets=30, **_SHAPE, seq_len=128, batch_size=32, save_every=200, eval_limit=20)
_BUNDLED_BASE = dict(_BUNDLED, stage="pretrain", pretrain_steps=9000, sft_steps=0, lr=3e-3, warmup_steps=500,
                     eval_every=3000, eval_protocols="completion")
_BUNDLED_CHAT = dict(_BUNDLED, stage="sft", pretrain_steps=0, sft_steps=3200, replay=0.5, lr=2e-3, warmup_steps=50,
                     eval_every=1600, eval_protocols="chat")
_BUNDLED_MIXED = dict(_BUNDLED, batch_size=8, pretrain_steps=0, sft_steps=34400, replay=0.5, lr=3e-3,
                      warmup_steps=200, save_every=2000, eval_every=4000)
PRESETS: dict[str, dict] = {
    # A few seconds on a CPU: for tests and smoke runs.
    "micro": dict(output_dir="runs/micro", n_sonnets=8, vocab_size=320, d_model=32, n_heads=2, n_kv_heads=1,
                  n_layers=1, mlp_hidden_size=64, max_sequence_length=320, seq_len=32, answer_slots=48, batch_size=8,
                  pretrain_steps=30, sft_steps=10, warmup_steps=5, log_every=5, save_every=10,
                  eval_limit=4, final_eval=False),
    "sonnets-mdm-base": dict(_BUNDLED_BASE, output_dir="assets/models/sonnets-mdm-base", objective="mdm"),
    "sonnets-mdm": dict(_BUNDLED_CHAT, output_dir="assets/models/sonnets-mdm", objective="mdm",
                        init_from="assets/models/sonnets-mdm-base"),
    "sonnets-arm": dict(_BUNDLED_MIXED, output_dir="assets/models/sonnets-arm", objective="arm"),
}


# ---------------------------------------------------------------------------------------------
# Losses (pure functions)

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def sample_t(batch_size: int, how: str, gen: torch.Generator) -> torch.Tensor:
    """The noise levels of one batch -> [B] in [0, 1). "iid": independent uniforms. "stratified": one
    uniform offset u, then t_i = (u + i / B) mod 1 (MDLM's low-discrepancy sampler): every batch covers
    [0, 1) evenly, so the batch's loss varies less from step to step while each t_i stays uniform."""
    if how == "iid":
        return torch.rand(batch_size, generator=gen)
    if how == "stratified":
        return (torch.rand(1, generator=gen) + torch.arange(batch_size) / batch_size) % 1.0
    raise ValueError(f"t_sampling must be one of {T_SAMPLING}, got {how!r}")


def forward_process(input_ids: torch.Tensor, t: torch.Tensor, u: torch.Tensor, mask_id: int, eps: float = 1e-3,
                    maskable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask each token with probability p = (1 - eps) t + eps.

    input_ids [B, L]; t [B] ~ U(0, 1); u [B, L] ~ U(0, 1) (token i is masked when u < p);
    maskable [B, L] bool (SFT: False on the prompt, which is never masked).
    -> noisy ids [B, L], masked [B, L] bool, p [B]
    """
    p = (1 - eps) * t + eps  # [B]
    masked = u < p[:, None]  # [B, L]
    if maskable is not None:
        masked = masked & maskable
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy, masked, p


def mdm_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, p: torch.Tensor,
             answer_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Masked-diffusion loss: cross-entropy on masked tokens only, each weighted by 1 / p.

    logits [B, L, V]; targets [B, L]; masked [B, L] bool; p [B].
    Pre-training (answer_lengths None): sum / (B * L).
    SFT: answer_lengths [B] (answer + EOS padding); each sequence's sum / its answer length, then
    the mean over the batch.
    """
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # [B, L]
    weighted = ce * masked / p[:, None]  # [B, L]
    if answer_lengths is None:
        return weighted.sum() / targets.numel()
    return (weighted.sum(1) / answer_lengths).mean()


def arm_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy of a causal model.

    logits [B, L, V] (position i predicts token i+1); targets [B, L];
    loss_mask [B, L] bool over the *predicted* tokens (SFT: answer + its stop token), None = all.
    Pre-training: mean over all predicted tokens. SFT: mean over each sequence's answer tokens,
    then the mean over the batch (the same normalisation as the MDM's SFT loss).
    """
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets[:, 1:], reduction="none")  # [B, L-1]
    if loss_mask is None:
        return ce.mean()
    m = loss_mask[:, 1:].float()  # [B, L-1]
    return ((ce * m).sum(1) / m.sum(1).clamp(min=1)).mean()


# ---------------------------------------------------------------------------------------------
# Batches: a pure function of (seed, step, process index)

@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    prompt_lengths: torch.Tensor | None  # [B] (SFT) or None (pre-training)
    answer_ends: torch.Tensor | None  # [B] SFT: end of answer + stop token (ARM loss); None otherwise
    kind: str  # "pretrain" or "sft"
    gaps: torch.Tensor | None = None  # [B, L] bool: a row's one masked line (line_gap_prob), all False elsewhere


class BatchMaker:
    def __init__(self, cfg: TrainConfig, tokenizer, sonnets, sft_sonnets):
        self.cfg, self.tok = cfg, tokenizer
        self.sonnets, self.sft_sonnets = sonnets, sft_sonnets
        vocab = tokenizer.get_vocab()
        self.eos, self.eot = tokenizer.eos_token_id, vocab[EOT]
        self.newline = tokenizer("\n", add_special_tokens=False)["input_ids"]

    def rng(self, step: int, rank: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, step, rank])

    def __call__(self, step: int, rank: int = 0) -> Batch:
        rng = self.rng(step, rank)
        sft = step >= self.cfg.pretrain_steps and rng.random() >= self.cfg.replay
        return self.sft_batch(rng) if sft else self.pretrain_batch(rng)

    def pretrain_batch(self, rng: np.random.Generator) -> Batch:
        cfg, rows = self.cfg, []
        for _ in range(cfg.batch_size):
            row: list[int] = []
            while len(row) < cfg.seq_len:  # pack EOS-separated windows, cut at seq_len
                sonnet = self.sonnets[int(rng.integers(len(self.sonnets)))]
                text = pretraining_window(sonnet, rng, cfg.max_window_lines, cfg.header_prob)
                row += self.tok(text, add_special_tokens=False)["input_ids"] + [self.eos]
            rows.append(row[:cfg.seq_len])
        ids = torch.tensor(rows, dtype=torch.long)  # [B, seq_len]
        if rng.random() < cfg.random_length_prob:  # the recipe's 1% of random-length batches
            ids = ids[:, :int(rng.integers(1, cfg.seq_len + 1))]
        gaps = self.line_gaps(ids, rng) if cfg.line_gap_prob > 0 else None
        return Batch(ids, None, None, "pretrain", gaps)

    def line_gaps(self, ids: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """ids [B, L] -> [B, L] bool: in a line_gap_prob share of the rows, every token of one line (drawn
        by a uniform token of the row, so longer lines more often), the shape of a completion question."""
        sep = (ids == self.eos) | torch.isin(ids, torch.tensor(self.newline))  # [B, L]
        line = sep.cumsum(1)  # [B, L]: tokens of one line share a number
        gaps = torch.zeros_like(sep)
        for b in range(ids.shape[0]):
            words = (~sep[b]).nonzero().flatten()
            if rng.random() < self.cfg.line_gap_prob and len(words):
                j = words[int(rng.integers(len(words)))]
                gaps[b] = (line[b] == line[b, j]) & ~sep[b]
        return gaps

    def sft_batch(self, rng: np.random.Generator) -> Batch:
        cfg, prompts, answers = self.cfg, [], []
        for _ in range(cfg.batch_size):
            ex = sft_example(self.sft_sonnets[int(rng.integers(len(self.sft_sonnets)))], rng)
            prompts.append(chat_prompt_ids(self.tok, ex.messages))
            answers.append(self.tok(ex.answer, add_special_tokens=False)["input_ids"] + [self.eot])
        L = max(len(p) for p in prompts) + cfg.answer_slots
        if max(len(a) for a in answers) > cfg.answer_slots:
            raise ValueError(f"an answer of {max(len(a) for a in answers)} tokens exceeds answer_slots="
                             f"{cfg.answer_slots}: raise --answer-slots or --vocab-size")
        if L > cfg.max_sequence_length:
            raise ValueError(f"an SFT sequence of {L} tokens exceeds max_sequence_length={cfg.max_sequence_length}")
        # The answer is padded with EOS to the end of the sequence; that padding is trained.
        rows = [p + a + [self.eos] * (L - len(p) - len(a)) for p, a in zip(prompts, answers)]
        return Batch(torch.tensor(rows, dtype=torch.long),
                     torch.tensor([len(p) for p in prompts]),
                     torch.tensor([len(p) + len(a) for p, a in zip(prompts, answers)]), "sft")


def batch_loss(model, batch: Batch, cfg: TrainConfig, mask_id: int, gen: torch.Generator) -> torch.Tensor:
    """Draw the noise (MDM) and compute the objective's loss on one batch."""
    ids = batch.input_ids  # [B, L] on the model's device
    B, L = ids.shape
    cols = torch.arange(L, device=ids.device)[None, :]  # [1, L]
    if cfg.objective == "arm":
        loss_mask = None
        if batch.prompt_lengths is not None:  # answer tokens and the stop token only
            loss_mask = (cols >= batch.prompt_lengths[:, None]) & (cols < batch.answer_ends[:, None])
        return arm_loss(model(ids).logits, ids, loss_mask)
    t = sample_t(B, cfg.t_sampling, gen).to(ids.device)  # [B]
    u = torch.rand(B, L, generator=gen).to(ids.device)  # [B, L]
    maskable = answer_lengths = None
    if batch.prompt_lengths is not None:
        maskable = cols >= batch.prompt_lengths[:, None]  # [B, L]
        answer_lengths = (L - batch.prompt_lengths).float()  # [B], EOS padding included
    noisy, masked, p = forward_process(ids, t, u, mask_id, cfg.mask_eps, maskable)
    if batch.gaps is not None and batch.gaps.any():  # a gap row: its line masked, weighted by 1 / its share
        rows = batch.gaps.any(1)  # [B]
        masked = torch.where(rows[:, None], batch.gaps, masked)
        noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
        p = torch.where(rows, batch.gaps.sum(1) / L, p)
    return mdm_loss(model(noisy).logits, ids, masked, p, answer_lengths)


# ---------------------------------------------------------------------------------------------
# Checkpoints

class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do about it."""


# Settings that leave the weights alone: a resumed run may change them freely.
RUN_ONLY = {"preset", "threads", "compile", "log_every", "progress", "save_every", "keep_checkpoints",
            "final_eval", "eval_every", "eval_limit"}
KEEP_CHECKPOINTS = 2  # the newest and one before it, in case the newest turns out unreadable


def _checkpoints(out: Path) -> list[Path]:
    """checkpoints/step-N folders, oldest first (complete or not: a resume checks each one)."""
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    steps = [p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name)]
    return sorted(steps, key=lambda p: int(p.name.removeprefix("step-")))


@contextlib.contextmanager
def _writing(path: Path):
    """Turn a failed write (a full disk, a read-only folder) into a TrainingError that says so."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # torch's C++ writer reports a full disk as "basic_ios::clear"
        free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
        if getattr(e, "errno", None) == errno.ENOSPC or free < 64 * 2**20:
            raise TrainingError(f"the disk is full ({free / 2**20:.0f} MB free) while writing {path}: free some "
                                "space, then continue with --resume (the last complete checkpoint is kept)") from None
        raise TrainingError(f"could not write {path}: {type(e).__name__}: {e}") from None


def save_checkpoint(accelerator, out: Path, step: int, history: dict, tokens: int, elapsed: float) -> None:
    """Write to checkpoints/.tmp-step-N, then rename: a kill mid-save leaves no half checkpoint. The
    newest KEEP_CHECKPOINTS stay."""
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = out / "checkpoints" / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        with _writing(tmp):
            accelerator.save_state(str(tmp))
            if accelerator.is_main_process:
                (tmp / "trainer_state.json").write_text(json.dumps(dict(step=step, tokens=tokens, elapsed=elapsed,
                                                                        history=history)))
    except TrainingError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)  # only when re-saving the same step
        os.replace(tmp, final)  # atomic: the folder appears complete or not at all
        for old in _checkpoints(out)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def resume_state(accelerator, out: Path, say) -> dict | None:
    """Load the newest checkpoint that reads back whole (model, optimizer, trainer_state.json), saying
    which were skipped and why -> its trainer state; None when there is no checkpoint at all."""
    found = _checkpoints(out)
    if not found:
        return None
    skipped = []
    for ckpt in reversed(found):
        try:
            state = json.loads((ckpt / "trainer_state.json").read_text())
            if not {"step", "history"} <= set(state):
                raise ValueError("trainer_state.json lacks the step or the history")
            accelerator.load_state(str(ckpt))
        except Exception as e:  # noqa: BLE001  (a missing file, bad JSON, a truncated tensor file: all mean skip it)
            skipped.append(f"{ckpt.name} ({type(e).__name__}: {str(e).strip()[:120]})")
            continue
        if skipped:
            say(f"--resume: skipped unreadable checkpoint(s) {', '.join(skipped)}; resuming from {ckpt.name}")
        return state
    raise TrainingError(f"--resume: no checkpoint in {out / 'checkpoints'} reads back: {'; '.join(skipped)}. "
                        "Start afresh with --overwrite.")


def setting_changes(saved: dict, now: dict) -> list[str]:
    """The settings (other than RUN_ONLY) that differ between a checkpoint's run and this one."""
    return [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if k not in RUN_ONLY and saved.get(k) != now[k]]


def _holds_a_run(out: Path) -> list[str]:
    return [name for name in ("model.safetensors", "metrics.json", "checkpoints") if (out / name).exists()]


# ---------------------------------------------------------------------------------------------
# Model, tokenizer, final save

def build_tokenizer(cfg: TrainConfig, sonnets):
    return train_bpe_tokenizer(tokenizer_texts(sonnets), cfg.vocab_size)


def build_model(cfg: TrainConfig, tokenizer):
    config = LLaDAConfig(
        d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, n_layers=cfg.n_layers,
        mlp_hidden_size=cfg.mlp_hidden_size, vocab_size=len(tokenizer), embedding_size=len(tokenizer),
        max_sequence_length=cfg.max_sequence_length, rope_theta=cfg.rope_theta,
        mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, causal=cfg.objective == "arm")
    return LLaDAModelLM(config)


def save_final(model, tokenizer, cfg: TrainConfig, out: Path) -> None:
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.save_dtype]
    tmp = out.parent / f".tmp-{out.name}-model"
    shutil.rmtree(tmp, ignore_errors=True)
    copy = type(model)(model.config)
    copy.load_state_dict(model.state_dict())
    copy.to(dtype).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / TRAINING_META).write_text(json.dumps(training_meta(cfg), indent=2))
    for f in tmp.iterdir():  # move file by file: out/ also holds metrics and checkpoints
        os.replace(f, out / f.name)
    tmp.rmdir()


def plot_loss(history: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in ("pretrain", "sft"):
        pts = [(h["tokens"], h["loss"]) for h in history["train"] if h["kind"] == kind]
        if pts:
            ax.plot(*zip(*pts), ".-", ms=2, lw=0.8, alpha=0.8, label=f"{kind} loss")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    if history["eval"]:
        ax2 = ax.twinx()
        for key, style, label in (("completion_forward", "g-o", "held-out completion forward"),
                                  ("completion_reversal", "r-o", "held-out completion reversal"),
                                  ("forward", "g:", "held-out chat forward"), ("reversal", "r:", "held-out chat reversal")):
            pts = [(e["tokens"], e[key]) for e in history["eval"] if e.get(key) is not None]
            if pts:
                ax2.plot(*zip(*pts), style, ms=3, label=label)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("exact match")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(f"{history['objective']} training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The loop

def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, accept_changes: bool = False) -> Path:
    """Run (or with `resume`, continue) a training run into cfg.output_dir. A fresh run refuses a folder
    that holds another run unless `overwrite`; a resume refuses other settings unless `accept_changes`."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {cfg.objective!r}")
    _protocols(cfg)  # a bad list fails now, not after an hour of training
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Denormal floats (the far tails of a confident softmax) slowed CPU steps 1.55x as the MDM loss
    # fell (measured on a checkpoint); flushing them to zero changes nothing fp32 training resolves.
    torch.set_flush_denormal(True)
    accelerator = Accelerator()
    out = Path(cfg.output_dir)
    all_sonnets = load_sonnets(cfg.sonnets_file or SONNETS_FILE)
    sonnets = all_sonnets[:cfg.n_sonnets]
    sft_sonnets, held_out = split_corpus(all_sonnets, cfg.n_sonnets)

    if not resume and not overwrite and _holds_a_run(out):
        raise TrainingError(f"{out} holds another run ({', '.join(_holds_a_run(out))}): continue it with --resume, "
                            "or replace it with --overwrite")
    ckpts = _checkpoints(out) if resume else []
    if resume and not ckpts:
        accelerator.print(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch")
    if cfg.init_from:
        loaded = load_model(cfg.init_from, device="cpu", dtype="fp32")
        model, tokenizer = loaded.model.train(), loaded.tokenizer
        if model.config.causal != (cfg.objective == "arm"):
            raise ValueError(f"--init-from {cfg.init_from} has causal={model.config.causal}, "
                             f"objective is {cfg.objective}")
    else:
        tok_dir = out / "checkpoints" / "tokenizer"
        if ckpts and tok_dir.is_dir():
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        else:
            tokenizer = build_tokenizer(cfg, sonnets)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, tokenizer)
    if accelerator.is_main_process:
        if not resume:  # a fresh run never mixes with an older run's checkpoints
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        for stale in (out / "checkpoints").glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tokenizer.save_pretrained(out / "checkpoints" / "tokenizer")
    mask_id = tokenizer.mask_token_id

    if cfg.freeze:
        frozen = [p.requires_grad_(False) for n, p in model.named_parameters() if re.search(cfg.freeze, n)]
        if not frozen:
            raise ValueError(f"--freeze {cfg.freeze!r} matches no parameter name")
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay),
                                   dict(params=no_decay, weight_decay=0.0)],
                                  lr=cfg.lr, betas=(0.9, cfg.beta2))
    model, optimizer = accelerator.prepare(model, optimizer)

    step, tokens, elapsed0 = 0, 0, 0.0  # elapsed0: training seconds before this process started
    settings = training_meta(cfg)["config"]
    history = dict(objective=cfg.objective, train=[], eval=[], config=settings)
    state = resume_state(accelerator, out, accelerator.print) if ckpts else None
    if state is not None:
        step, history = state["step"], state["history"]
        changes = setting_changes(history.get("config", {}), settings)
        if changes and not accept_changes:
            raise TrainingError(f"--resume: the checkpoint at step {step} was trained with other settings ("
                                f"{'; '.join(changes)}); resume with the same flags, or add --accept-changes to "
                                "continue with the new ones on purpose")
        if changes:  # metrics.json then agrees with training_meta.json, and says what changed when
            history["config"] = settings
            history.setdefault("changes", []).append(dict(step=step, changes=changes))
        last = history["train"][-1] if history["train"] else dict(tokens=0, elapsed=0.0)
        tokens, elapsed0 = state.get("tokens", last["tokens"]), state.get("elapsed", last["elapsed"])
        accelerator.print(f"resumed at step {step}" + (f" with changed settings: {'; '.join(changes)}" if changes
                                                       else ""))

    batches = BatchMaker(cfg, tokenizer, sonnets, sft_sonnets)
    rank = accelerator.process_index
    n_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    n_trained = sum(p.numel() for p in accelerator.unwrap_model(model).parameters() if p.requires_grad)
    trained = f" ({n_trained / 1e6:.2f}M trained)" if n_trained < n_params else ""
    accelerator.print(f"{cfg.objective}: {n_params / 1e6:.2f}M parameters{trained}, {len(tokenizer)} tokens, "
                      f"{len(sonnets)} sonnets ({len(held_out)} held out of SFT: "
                      f"{held_out[0].number}-{held_out[-1].number}), {cfg.total_steps} steps")
    bar = tqdm(total=cfg.total_steps, initial=step, disable=not (cfg.progress and accelerator.is_main_process),
               dynamic_ncols=True)
    window_tokens, window_start, run_start = 0, time.perf_counter(), time.perf_counter()
    window_loss: dict[str, torch.Tensor] = {}  # batch kind -> summed loss since the last log
    window_count: dict[str, int] = {}
    model.train()
    # Compiled for the steps only; evaluation and saving use the model itself. One thread, the base preset's
    # batch: a step measured 1.1-1.2x faster compiled than eager on this project's 2-core CPU.
    step_model = torch.compile(model) if cfg.compile else model
    while step < cfg.total_steps:
        batch = batches(step, rank)
        gen = torch.Generator().manual_seed(int(batches.rng(step, rank).integers(2**62)) ^ 0x5EED)
        batch = Batch(*(x.to(accelerator.device) if isinstance(x, torch.Tensor) else x
                        for x in dataclasses.astuple(batch)))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = batch_loss(step_model, batch, cfg, mask_id, gen)
        accelerator.backward(loss)
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        n_tok = batch.input_ids.numel() * accelerator.num_processes
        tokens += n_tok
        window_tokens += n_tok
        window_loss[batch.kind] = window_loss.get(batch.kind, 0.0) + loss.detach()
        window_count[batch.kind] = window_count.get(batch.kind, 0) + 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.total_steps:
            now = time.perf_counter()
            tps = window_tokens / max(now - window_start, 1e-9)
            # The window's mean loss per batch kind (single batches are noisy), on this process only: a
            # collective op here could deadlock, as processes may see different kinds in a window.
            for kind in sorted(window_loss):
                mean_loss = (window_loss[kind] / window_count[kind]).item()
                history["train"].append(dict(step=step, tokens=tokens, loss=mean_loss, lr=lr_at(step - 1, cfg),
                                             kind=kind, tok_per_s=tps, elapsed=elapsed0 + now - run_start))
                bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{tps:,.0f}", stage=kind)
                if not cfg.progress:
                    accelerator.print(f"step {step}/{cfg.total_steps} {kind} loss {mean_loss:.4f} "
                                      f"lr {lr_at(step - 1, cfg):.2e} {tps:,.0f} tok/s", flush=True)
            window_tokens, window_start, window_loss, window_count = 0, now, {}, {}
        at_eval = cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.total_steps)  # the last step too
        if at_eval and accelerator.is_main_process:
            history["eval"].append(dict(step=step, tokens=tokens, **_quick_eval(
                accelerator.unwrap_model(model), tokenizer, all_sonnets, cfg, step > cfg.pretrain_steps)))
            bar.write(f"step {step}: held-out " + _eval_line(history["eval"][-1]))
            model.train()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.total_steps:
            save_checkpoint(accelerator, out, step, history, tokens, elapsed0 + time.perf_counter() - run_start)
            if accelerator.is_main_process:
                (out / "metrics.json").write_text(json.dumps(history, indent=1))
    bar.close()
    history["elapsed_s"] = elapsed0 + time.perf_counter() - run_start  # wall time of the run, evals included

    if cfg.keep_checkpoints:
        save_checkpoint(accelerator, out, step, history, tokens, elapsed0 + time.perf_counter() - run_start)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with _writing(out / "model.safetensors"):
            save_final(accelerator.unwrap_model(model), tokenizer, cfg, out)
            (out / "metrics.json").write_text(json.dumps(history, indent=1))
        plot_loss(history, out / "loss.png")
        base = Path(cfg.init_from) if cfg.init_from else None  # the run this one started from
        if base and base.resolve() != out.resolve():  # its curves travel with the model as base_*
            for name in ("metrics.json", "loss.png"):
                if (base / name).is_file():
                    shutil.copyfile(base / name, out / f"base_{name}")
        if not cfg.keep_checkpoints:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        if cfg.final_eval:
            final_evaluation(out, _protocols(cfg), bar.write if cfg.progress else accelerator.print)
    accelerator.wait_for_everyone()
    accelerator.print(f"saved {out} ({history['elapsed_s']:.0f} s of training)")
    accelerator.end_training()
    return out


def _protocols(cfg: TrainConfig) -> tuple[str, ...]:
    from .poems import PROTOCOLS

    chosen = tuple(p.strip() for p in cfg.eval_protocols.split(",") if p.strip())
    if not chosen or any(p not in PROTOCOLS for p in chosen):
        raise ValueError(f"eval_protocols takes a comma-separated subset of {PROTOCOLS}, got {cfg.eval_protocols!r}")
    return chosen


def final_evaluation(out: Path, protocols: tuple[str, ...], say=print) -> None:
    """Evaluate the saved model as the page will load it (the held-out split, and for the chat protocol 65
    pairs of the SFT split) and store the result with it, keyed by its fingerprint: the page shows it at once."""
    from .poems import STORED_LIMITS, evaluate_all, evaluation_key, format_table, store_evaluation

    started = time.perf_counter()
    loaded = load_model(str(out), device="cpu")
    corpus = PoemCorpus.for_card(loaded.card)
    decoding = Decoding.for_model(loaded.card, corpus, loaded.tokenizer)
    # The SFT split only where the page reads it: the chat tab's figures of the sonnets it was fine-tuned on.
    results = []
    for protocol in protocols:
        splits = ("heldout", "train") if protocol == "chat" else ("heldout",)
        results += evaluate_all(loaded, corpus, protocols=(protocol,), splits=splits, decoding=decoding,
                                limits=STORED_LIMITS)
    store_evaluation(out, evaluation_key(loaded, decoding, STORED_LIMITS), results)
    say(f"final evaluation ({time.perf_counter() - started:.0f} s):\n{format_table(results)}")


def _eval_line(e: dict) -> str:
    """A periodic eval's figures in words (only those it measured)."""
    parts = []
    if "completion_forward" in e:
        parts.append(f"completion forward {e['completion_forward']:.2f} reversal {e['completion_reversal']:.2f}")
    if "forward" in e:
        parts.append(f"chat forward {e['forward']:.2f} reversal {e['reversal']:.2f} "
                     f"(train {e['train_forward']:.2f} / {e['train_reversal']:.2f})")
    return "; ".join(parts) or "nothing measured yet (chat before SFT)"


def training_meta(cfg: TrainConfig) -> dict:
    """training_meta.json: what the model description (`loading.ModelCard`) reads of a run. It records the
    preset and the settings, never the output folder (a path of the machine that trained it)."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "output_dir"}
    return dict(n_sonnets=cfg.n_sonnets, objective=cfg.objective, preset=cfg.preset, config=config)


def _quick_eval(model, tokenizer, sonnets, cfg: TrainConfig, sft_started: bool) -> dict:
    """Held-out completion (both models), and once SFT has begun the chat protocol on the held-out and
    train splits, on `eval_limit` line pairs, decoded as the page decodes: the accuracy-vs-tokens curves."""
    model.eval()
    card = ModelCard.build("training", tokenizer, model.config, training_meta(cfg))
    loaded = LoadedModel(model, tokenizer, card)
    corpus = PoemCorpus(sonnets, cfg.n_sonnets)
    decoding = Decoding.for_model(card, corpus, tokenizer)
    run = lambda split, protocol: evaluate(loaded, corpus, split, protocol, decoding=decoding,  # noqa: E731
                                           limit=cfg.eval_limit)
    out, protocols = {}, _protocols(cfg)
    if "completion" in protocols:
        done = run("heldout", "completion")
        out.update(completion_forward=done.forward, completion_reversal=done.reversal)
    if sft_started and "chat" in protocols:
        held, train = run("heldout", "chat"), run("train", "chat")
        out.update(forward=held.forward, reversal=held.reversal, train_forward=train.forward,
                   train_reversal=train.reversal)
    return out


# ---------------------------------------------------------------------------------------------
# CLI: every TrainConfig field is a flag; the preset fills the ones not given

def _field_comments(cls) -> dict[str, str]:
    """The `# ...` comment after each field of a dataclass: the one place its meaning is written."""
    import inspect

    found = re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", inspect.getsource(cls), flags=re.M)
    return dict(found)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, dict]:
    """-> the run's settings, and the flags of `train` (resume, overwrite, accept_changes)."""
    parser = argparse.ArgumentParser(prog="python -m llada_app.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="micro",
                        help="starting values (default: micro); any flag below overrides them")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in the output folder (an unreadable newest one "
                             "falls back to the one before it)")
    parser.add_argument("--accept-changes", action="store_true",
                        help="with --resume: continue although some settings differ from the checkpoint's run")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run the output folder already holds (its checkpoints are deleted)")
    defaults, notes = TrainConfig(), _field_comments(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "preset":  # the --preset above
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{notes.get(f.name, '')} (default {default})")
        else:
            kind = {int: int, float: float}.get(type(default), str)
            choices = {"objective": OBJECTIVES, "stage": STAGES, "save_dtype": ("fp16", "bf16", "fp32"),
                       "t_sampling": T_SAMPLING}.get(f.name)
            parser.add_argument(flag, type=kind, default=None, choices=choices,
                                help=f"{notes.get(f.name, '')} (default {default})".replace("%", "%%"))
    args = parser.parse_args(argv)
    values = dataclasses.asdict(defaults) | PRESETS[args.preset] | dict(preset=args.preset)
    values |= {k: v for k, v in vars(args).items() if k in values and v is not None}
    cfg = TrainConfig(**values)
    if cfg.stage == "pretrain":
        cfg.sft_steps = 0
    elif cfg.stage == "sft":
        cfg.pretrain_steps = 0
    if cfg.total_steps < 1:
        parser.error("nothing to train: pretrain_steps + sft_steps must be >= 1")
    if not 0 <= cfg.replay <= 1:
        parser.error("--replay must be in [0, 1]")
    if args.accept_changes and not args.resume:
        parser.error("--accept-changes goes with --resume")
    return cfg, dict(resume=args.resume, overwrite=args.overwrite, accept_changes=args.accept_changes)


def main(argv: list[str] | None = None) -> None:
    cfg, flags = parse_args(argv)
    try:
        train(cfg, **flags)
    except (TrainingError, ValueError) as e:  # said in words: a folder, a checkpoint, a setting, the disk
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
