"""Training: the losses against direct computations, the micro run, kill-and-resume, accelerate launch."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from llada_app.train import (PRESETS, Batch, TrainConfig, arm_loss, batch_loss, forward_process, lr_at, mdm_loss,
                             parse_args, train)

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "assets" / "models"


def _direct_mdm(logits, targets, masked, p, answer_lengths=None):
    """The loss written out token by token (the reference the vectorised function must match)."""
    B, L, _ = logits.shape
    per_seq = []
    for b in range(B):
        s = 0.0
        for i in range(L):
            if masked[b, i]:
                s += -torch.log_softmax(logits[b, i].double(), -1)[targets[b, i]].item() / p[b].item()
        per_seq.append(s)
    if answer_lengths is None:
        return sum(per_seq) / (B * L)
    return sum(s / answer_lengths[b].item() for b, s in enumerate(per_seq)) / B


def test_forward_process_masks_with_probability_p_and_protects_the_prompt():
    ids = torch.arange(40).view(2, 20)  # [B, L]
    t = torch.tensor([0.0, 1.0])
    u = torch.linspace(0, 0.999, 20).repeat(2, 1)
    noisy, masked, p = forward_process(ids, t, u, mask_id=-1, eps=1e-3)
    assert torch.allclose(p, torch.tensor([1e-3, 1.0]))
    assert masked[0].sum() == 1 and masked[1].all()  # u < p
    assert (noisy[masked] == -1).all() and (noisy[~masked] == ids[~masked]).all()
    maskable = torch.arange(20)[None, :] >= torch.tensor([[5], [12]])  # prompts of 5 and 12 tokens
    noisy, masked, _ = forward_process(ids, torch.ones(2), u, mask_id=-1, maskable=maskable)
    assert not masked[0, :5].any() and not masked[1, :12].any()  # t = 1 still never masks the prompt
    assert masked[0, 5:].all() and masked[1, 12:].all()
    assert (noisy[:, :5] == ids[:, :5]).all()


def test_mdm_loss_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    B, L, V = 3, 7, 11
    logits = torch.randn(B, L, V, generator=g)
    targets = torch.randint(0, V, (B, L), generator=g)
    t, u = torch.rand(B, generator=g), torch.rand(B, L, generator=g)
    _, masked, p = forward_process(targets, t, u, mask_id=V - 1)
    assert masked.any() and not masked.all()
    got = mdm_loss(logits, targets, masked, p).item()
    assert got == pytest.approx(_direct_mdm(logits, targets, masked, p), rel=1e-5)
    # SFT: prompt protected, per-sequence normalisation by answer length (EOS padding included)
    prompt = torch.tensor([2, 4, 3])
    maskable = torch.arange(L)[None, :] >= prompt[:, None]
    _, masked, p = forward_process(targets, t, u, mask_id=V - 1, maskable=maskable)
    lengths = (L - prompt).float()
    got = mdm_loss(logits, targets, masked, p, lengths).item()
    assert got == pytest.approx(_direct_mdm(logits, targets, masked, p, lengths), rel=1e-5)
    # the 1/p weighting: halving p doubles the loss
    assert mdm_loss(logits, targets, masked, p / 2, lengths).item() == pytest.approx(2 * got, rel=1e-5)


def test_arm_loss_is_next_token_cross_entropy_on_the_answer():
    g = torch.Generator().manual_seed(1)
    B, L, V = 2, 6, 9
    logits = torch.randn(B, L, V, generator=g)
    targets = torch.randint(0, V, (B, L), generator=g)
    full = F.cross_entropy(logits[:, :-1].reshape(-1, V), targets[:, 1:].reshape(-1))
    assert arm_loss(logits, targets).item() == pytest.approx(full.item(), rel=1e-6)
    loss_mask = torch.zeros(B, L, dtype=torch.bool)
    loss_mask[0, 3:5] = True  # answer tokens 3, 4 of row 0 (predicted from positions 2, 3)
    loss_mask[1, 4:6] = True
    expect = []
    for b, cols in ((0, [3, 4]), (1, [4, 5])):
        expect.append(sum(F.cross_entropy(logits[b, c - 1][None], targets[b, c][None]).item() for c in cols) / 2)
    assert arm_loss(logits, targets, loss_mask).item() == pytest.approx(sum(expect) / 2, rel=1e-6)


def test_batch_loss_never_masks_the_sft_prompt(tiny_model, tiny_tokenizer):
    """Through batch_loss: the logits the model sees keep the prompt intact at every noise level."""
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, ids):
            seen.append(ids.clone())
            return tiny_model(ids)

    ids = torch.randint(10, 100, (4, 12))
    batch = Batch(ids, torch.tensor([3, 5, 7, 2]), torch.tensor([6, 8, 9, 5]), "sft")
    cfg = TrainConfig()
    mask_id = tiny_tokenizer.mask_token_id
    for seed in range(5):
        batch_loss(Spy(), batch, cfg, mask_id, torch.Generator().manual_seed(seed))
    for noisy in seen:
        for b, n in enumerate([3, 5, 7, 2]):
            assert (noisy[b, :n] == ids[b, :n]).all()
    assert any((noisy == mask_id).any() for noisy in seen)


@pytest.mark.parametrize("objective,sft", [("mdm", False), ("mdm", True), ("arm", False), ("arm", True)])
def test_batch_loss_is_the_objective_on_noise_drawn_from_the_generator(tiny_tokenizer, objective, sft):
    """batch_loss against the loss functions called by hand on the same draws: t from sample_t, then u
    [B, L] from the same generator; SFT masks only from each prompt's end on (its first answer token
    included) and divides by the answer length L - prompt; the ARM scores the answer and its stop token."""
    from conftest import tiny_config
    from llada_app.modeling import LLaDAModelLM
    from llada_app.train import sample_t

    torch.manual_seed(3)
    model = LLaDAModelLM(tiny_config(tiny_tokenizer, init_std=0.3)).eval()  # CE differs by position
    mask_id = tiny_tokenizer.mask_token_id
    B, L = 4, 12
    ids = torch.randint(10, 100, (B, L), generator=torch.Generator().manual_seed(4))
    prompts, ends = torch.tensor([3, 5, 7, 2]), torch.tensor([6, 8, 9, 5])
    batch = Batch(ids, prompts if sft else None, ends if sft else None, "sft" if sft else "pretrain")
    cfg = TrainConfig(objective=objective, t_sampling="iid")
    with torch.no_grad():
        got = batch_loss(model, batch, cfg, mask_id, torch.Generator().manual_seed(5))
        again = batch_loss(model, batch, cfg, mask_id, torch.Generator().manual_seed(5))
        other = batch_loss(model, batch, cfg, mask_id, torch.Generator().manual_seed(6))
        if objective == "arm":
            cols = torch.arange(L)[None, :]
            loss_mask = ((cols >= prompts[:, None]) & (cols < ends[:, None])) if sft else None
            want = arm_loss(model(ids).logits, ids, loss_mask)
        else:
            g = torch.Generator().manual_seed(5)
            t = sample_t(B, "iid", g)
            u = torch.rand(B, L, generator=g)
            maskable = torch.arange(L)[None, :] >= prompts[:, None] if sft else None
            noisy, masked, p = forward_process(ids, t, u, mask_id, cfg.mask_eps, maskable)
            want = mdm_loss(model(noisy).logits, ids, masked, p, (L - prompts).float() if sft else None)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert again.item() == got.item()  # the generator decides every draw
    assert (other.item() != got.item()) == (objective == "mdm")


def test_line_gaps_mask_one_whole_line_and_the_loss_is_its_mean_cross_entropy():
    """line_gap_prob: a row of the pre-training batch is either left to the usual noise or has exactly one
    of its lines masked (every token of it, no separator), and that row's loss is the line's mean CE."""
    import dataclasses

    from conftest import tiny_config
    from transformers import AutoTokenizer

    from llada_app.data import load_sonnets
    from llada_app.modeling import LLaDAModelLM
    from llada_app.train import BatchMaker

    tok = AutoTokenizer.from_pretrained(MODELS / "sonnets-mdm-base")
    sonnets = load_sonnets()[:6]
    lines = {line.strip() for s in sonnets for line in s.lines} | {f"Sonnet {s.number}" for s in sonnets}
    values = dataclasses.asdict(TrainConfig()) | dict(seq_len=64, batch_size=16, random_length_prob=0.0)
    none = BatchMaker(TrainConfig(**values), tok, sonnets, sonnets)(0)
    assert none.gaps is None
    for share in (0.5, 1.0):
        batch = BatchMaker(TrainConfig(**values | dict(line_gap_prob=share)), tok, sonnets, sonnets)(0)
        assert (batch.input_ids == none.input_ids).all()  # the same text: the share only picks gaps
        rows = batch.gaps.any(1)
        assert rows.all() if share == 1.0 else 0 < rows.sum() < 16
        for b in rows.nonzero().flatten():
            where = batch.gaps[b].nonzero().flatten()
            assert (where == torch.arange(where[0], where[-1] + 1)).all()  # one contiguous run
            text = tok.decode(batch.input_ids[b, where]).strip()
            ends_row = where[-1] == batch.input_ids.shape[1] - 1
            assert text in lines or (ends_row and any(line.startswith(text) for line in lines)), text
            before, after = batch.input_ids[b, where[0] - 1], batch.input_ids[b, where[-1] + 1] if not ends_row else None
            assert where[0] == 0 or tok.decode(before) in ("\n", tok.eos_token)
            assert after is None or tok.decode(after) in ("\n", tok.eos_token)

    torch.manual_seed(0)
    model = LLaDAModelLM(tiny_config(tok, init_std=0.3)).eval()
    cfg = TrainConfig(**values | dict(line_gap_prob=1.0))
    gaps = batch.gaps
    with torch.no_grad():
        got = batch_loss(model, batch, cfg, tok.mask_token_id, torch.Generator().manual_seed(1))
        noisy = torch.where(gaps, tok.mask_token_id, batch.input_ids)
        ce = F.cross_entropy(model(noisy).logits.float().transpose(1, 2), batch.input_ids, reduction="none")
    want = ((ce * gaps).sum(1) / gaps.sum(1)).mean()  # every row a gap row: each line's mean CE
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_arm_loss_scores_a_one_token_answer_in_full():
    """An SFT row whose answer is a single predicted token: its loss is that token's CE, not a fraction."""
    g = torch.Generator().manual_seed(2)
    logits, targets = torch.randn(1, 5, 7, generator=g), torch.randint(0, 7, (1, 5), generator=g)
    loss_mask = torch.zeros(1, 5, dtype=torch.bool)
    loss_mask[0, 3] = True
    want = F.cross_entropy(logits[0, 2][None], targets[0, 3][None]).item()
    assert arm_loss(logits, targets, loss_mask).item() == pytest.approx(want, rel=1e-6)


def test_lr_schedule_values():
    """Warm-up to lr over warmup_steps, then a half cosine from lr to lr * min_lr_ratio at total_steps."""
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, pretrain_steps=100, sft_steps=10, min_lr_ratio=0.1)
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # the first step after warm-up: the peak
    assert lr_at(60, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way: the mid point
    assert lr_at(35, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert lr_at(110, cfg) == pytest.approx(1e-4)


def test_noise_levels_come_from_the_generator():
    from llada_app.train import sample_t

    for how in ("iid", "stratified"):
        a, b = (sample_t(8, how, torch.Generator().manual_seed(7)) for _ in range(2))
        assert torch.equal(a, b) and not torch.equal(a, sample_t(8, how, torch.Generator().manual_seed(8)))


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, pretrain_steps=100, sft_steps=0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) < lr_at(50, cfg) < lr_at(10, cfg)
    assert lr_at(1000, cfg) == pytest.approx(1e-4)


def test_cli_overrides_every_preset_value():
    cfg, flags = parse_args(["--preset", "micro", "--d-model", "48", "--lr", "0.01", "--stage", "pretrain",
                             "--no-progress", "--resume"])
    assert (cfg.d_model, cfg.lr, cfg.sft_steps, cfg.progress, cfg.preset) == (48, 0.01, 0, False, "micro")
    assert flags == dict(resume=True, overwrite=False, accept_changes=False)
    assert cfg.n_layers == PRESETS["micro"]["n_layers"]
    with pytest.raises(SystemExit):
        parse_args(["--objective", "gpt"])


def test_bundled_twins_share_size_data_and_compute():
    """The MDM and its ARM twin: the same corpus, tokenizer, model shape and chats, and bundled checkpoints
    trained by their presets for the whole schedule. Their equal CPU time is a measured figure (README),
    not checked here: a run's wall clock depends on what else its machine ran that day."""
    shared = ("n_sonnets", "vocab_size", "d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size",
              "max_sequence_length", "seq_len", "answer_slots", "replay", "seed")
    mdm, arm = (parse_args(["--preset", name])[0] for name in ("sonnets-mdm", "sonnets-arm"))
    assert [getattr(mdm, k) for k in shared] == [getattr(arm, k) for k in shared]
    assert (mdm.objective, arm.objective) == ("mdm", "arm")
    schedule = ("stage", "pretrain_steps", "sft_steps", "lr", "warmup_steps", "batch_size")
    for preset in ("sonnets-mdm-base", "sonnets-mdm", "sonnets-arm"):  # each bundled folder is named for its preset
        cfg = parse_args(["--preset", preset])[0]
        meta = json.loads((MODELS / preset / "training_meta.json").read_text())
        metrics = json.loads((MODELS / preset / "metrics.json").read_text())
        assert meta["preset"] == preset
        assert {k: meta["config"][k] for k in schedule} == {k: getattr(cfg, k) for k in schedule}
        assert metrics["train"][-1]["step"] == cfg.total_steps  # trained to the end of its schedule


def test_stratified_noise_levels_cover_the_unit_interval_evenly():
    from llada_app.train import sample_t

    gen = torch.Generator().manual_seed(0)
    t = sample_t(32, "stratified", gen)
    gaps = torch.sort(t).values.diff()
    assert t.shape == (32,) and ((0 <= t) & (t < 1)).all()
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 32))  # one offset, evenly spaced
    # each t_i is still uniform: over many batches the first one's mean is 1/2
    firsts = torch.stack([sample_t(32, "stratified", gen)[0] for _ in range(4000)])
    assert abs(firsts.mean().item() - 0.5) < 0.02
    iid = sample_t(32, "iid", gen)
    assert torch.sort(iid).values.diff().std() > 0.005  # independent draws are not evenly spaced
    with pytest.raises(ValueError, match="t_sampling"):
        sample_t(4, "sobol", gen)


def _micro(tmp_path, **kw) -> TrainConfig:
    cfg, _ = parse_args(["--preset", "micro", "--output-dir", str(tmp_path), "--no-progress"])
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _held_loss(model, cfg, tokenizer) -> float:
    """Mean loss on 8 fixed pre-training batches with fixed noise (the training loss itself is noisy)."""
    from llada_app.data import load_sonnets, split_corpus
    from llada_app.train import BatchMaker

    sonnets = load_sonnets()
    maker = BatchMaker(cfg, tokenizer, sonnets[:cfg.n_sonnets], split_corpus(sonnets, cfg.n_sonnets)[0])
    with torch.no_grad():
        losses = [batch_loss(model.eval(), maker.pretrain_batch(maker.rng(10_000 + k, 0)), cfg,
                             tokenizer.mask_token_id, torch.Generator().manual_seed(k)).item() for k in range(8)]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("objective", ["mdm", "arm"])
def test_micro_pretraining_lowers_the_loss_and_writes_outputs(tmp_path, objective):
    from llada_app.loading import load_model
    from llada_app.train import build_model

    cfg = _micro(tmp_path, objective=objective, sft_steps=10)
    out = train(cfg)
    history = json.loads((out / "metrics.json").read_text())
    assert [h["kind"] for h in history["train"]].count("sft") >= 1
    assert (out / "loss.png").stat().st_size > 0
    assert not (out / "checkpoints").exists()
    loaded = load_model(str(out), device="cpu")
    assert loaded.model.config.causal == (objective == "arm")
    assert next(iter(load_file(out / "model.safetensors").values())).dtype == torch.float16
    torch.manual_seed(cfg.seed)  # the initial weights of the run
    initial = build_model(cfg, loaded.tokenizer)
    before, after = _held_loss(initial, cfg, loaded.tokenizer), _held_loss(loaded.model, cfg, loaded.tokenizer)
    assert after < 0.85 * before, (before, after)


def test_compiled_steps_train_as_the_eager_ones(tmp_path):
    """--compile runs the training steps through torch.compile: the same losses step by step (up to the
    compiled kernels' rounding), and it is a run-only setting (a resume may switch it)."""
    from llada_app.train import RUN_ONLY

    losses = {}
    for compiled in (False, True):
        cfg, _ = parse_args(["--preset", "micro", "--output-dir", str(tmp_path / str(compiled)), "--no-progress",
                             "--stage", "pretrain", "--pretrain-steps", "10", "--random-length-prob", "0",
                             "--log-every", "1", "--save-every", "0"] + (["--compile"] if compiled else []))
        assert cfg.compile is compiled
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        out = train(cfg)
        assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) is compiled  # the steps ran compiled
        losses[compiled] = [h["loss"] for h in json.loads((out / "metrics.json").read_text())["train"]]
    assert len(losses[True]) == 10
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
    assert losses[True][-1] < losses[True][0]
    assert "compile" in RUN_ONLY


def test_second_run_starts_from_the_first_and_keeps_its_curves(tmp_path):
    """The bundled MDM's two runs: `--init-from` starts from the saved weights and tokenizer, and the
    first run's metrics.json / loss.png travel with the model as base_*."""
    from llada_app.loading import load_model

    base = train(_micro(tmp_path / "base", pretrain_steps=10, sft_steps=5))
    tuned = train(_micro(tmp_path / "tuned", stage="sft", pretrain_steps=0, sft_steps=3, init_from=str(base)))
    assert (tuned / "base_metrics.json").read_text() == (base / "metrics.json").read_text()
    assert (tuned / "base_loss.png").read_bytes() == (base / "loss.png").read_bytes()
    assert json.loads((tuned / "metrics.json").read_text())["train"][-1]["step"] == 3
    assert (tuned / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    a, b = load_model(str(base), device="cpu").model, load_model(str(tuned), device="cpu").model
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="causal"):
        train(_micro(tmp_path / "arm", objective="arm", stage="sft", pretrain_steps=0, sft_steps=1, init_from=str(base)))
    # --freeze: the matching parameters stay as the first run left them, the others train
    frozen = train(_micro(tmp_path / "frozen", stage="sft", pretrain_steps=0, sft_steps=3, init_from=str(base),
                          freeze="ff_proj|up_proj"))
    c = load_model(str(frozen), device="cpu").model.state_dict()
    for name, x in a.state_dict().items():
        assert torch.equal(x, c[name]) == ("ff_proj" in name or "up_proj" in name), name
    with pytest.raises(ValueError, match="matches no parameter"):
        train(_micro(tmp_path / "none", stage="sft", pretrain_steps=0, sft_steps=1, init_from=str(base),
                     freeze="no_such_weight"))


def _run(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "llada_app.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    common = ["--preset", "micro", "--pretrain-steps", "30", "--sft-steps", "15", "--save-every", "5",
              "--save-dtype", "fp32", "--threads", "1", "--no-progress", "--seed", "3"]
    ref = _run([*common, "--output-dir", str(tmp_path / "ref")])
    assert ref.wait(timeout=120) == 0, ref.stdout.read()

    out = tmp_path / "killed"
    proc = _run([*common, "--output-dir", str(out)])
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("step-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists()
    killed_at = [int(p.name.removeprefix("step-")) for p in (out / "checkpoints").glob("step-*")]
    assert killed_at and max(killed_at) < 45

    resumed = _run([*common, "--output-dir", str(out), "--resume"])
    text = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, text
    assert "resumed at step" in text
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    steps = [json.loads((d / "metrics.json").read_text())["train"][-1]["step"] for d in (tmp_path / "ref", out)]
    assert steps == [45, 45]


def test_checkpoint_save_is_atomic(tmp_path):
    """A leftover temporary folder (a kill mid-save) is never taken for a checkpoint."""
    from llada_app.train import _checkpoints

    (tmp_path / "checkpoints" / ".tmp-step-0000020").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000010").mkdir()
    (tmp_path / "checkpoints" / "step-0000010" / "trainer_state.json").write_text("{}")
    assert [p.name for p in _checkpoints(tmp_path)] == ["step-0000010"]


def test_accelerate_launch_two_cpu_processes(tmp_path):
    """The only proof that training runs distributed: two processes under `accelerate launch` (called
    through this interpreter, so a virtual environment's accelerate runs, PATH or not)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "llada_app.train", "--preset", "micro", "--output-dir", str(tmp_path),
         "--no-progress", "--pretrain-steps", "20", "--sft-steps", "10"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert history["train"][-1]["step"] == 30
    assert (tmp_path / "model.safetensors").is_file()


@pytest.mark.parametrize("name,causal", [("sonnets-mdm", False), ("sonnets-arm", True)])
def test_bundled_checkpoints_load_and_chat(name, causal):
    from llada_app.data import question
    from llada_app.loading import load_model
    from llada_app.poems import Answerer, Decoding, PoemCorpus
    from llada_app.tokenization import chat_prompt_ids

    loaded = load_model(str(MODELS / name), device="cpu")
    assert loaded.card.causal is causal and loaded.card.chat and loaded.card.trained_here
    tok = loaded.tokenizer
    q = question("From fairest creatures we desire increase,", "next")
    text = tok.decode(chat_prompt_ids(tok, [{"role": "user", "content": q}]))
    assert text.startswith("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n")
    assert text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    # a question of the SFT sonnets that the model's stored evaluation found answered right: answered again,
    # the same way, by the model just loaded
    from llada_app.poems import STORED_LIMITS, evaluation_key, stored_evaluation

    corpus = PoemCorpus.for_card(loaded.card)
    decoding = Decoding.for_model(loaded.card, corpus, tok)
    stored = stored_evaluation(loaded.folder, evaluation_key(loaded, decoding, STORED_LIMITS))
    item = next(r for r in stored if r.protocol == "chat" and r.split == "train").examples("previous")[0]
    q = question(item["given"], "previous")
    assert Answerer(loaded, decoding).chat([[{"role": "user", "content": q}]], [item["given"]]) == [item["expected"]]


def test_bundled_checkpoints_fit_the_size_budget():
    total = sum(f.stat().st_size for name in ("sonnets-mdm", "sonnets-arm") for f in (MODELS / name).iterdir())
    assert total <= 25 * 2**20


def test_periodic_eval_also_scores_the_last_step(tmp_path):
    """The accuracy-vs-tokens curve ends at the final model, even when eval_every does not divide the run."""
    train(_micro(tmp_path, pretrain_steps=6, sft_steps=4, eval_every=7, eval_limit=2, save_every=0))
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert [e["step"] for e in history["eval"]] == [7, 10]
    assert all(0 <= e["completion_forward"] <= 1 and 0 <= e["completion_reversal"] <= 1 for e in history["eval"])
    assert all(0 <= e["forward"] <= 1 and 0 <= e["train_reversal"] <= 1 for e in history["eval"])  # SFT has begun
    pretrain_only = train(_micro(tmp_path / "pre", pretrain_steps=4, sft_steps=0, eval_every=2, eval_limit=2,
                                 save_every=0))
    evals = json.loads((pretrain_only / "metrics.json").read_text())["eval"]
    assert [e["step"] for e in evals] == [2, 4] and all("forward" not in e for e in evals)  # no chat before SFT
    chat_only = train(_micro(tmp_path / "chat", pretrain_steps=2, sft_steps=2, eval_every=2, eval_limit=2,
                             save_every=0, eval_protocols="chat"))
    evals = json.loads((chat_only / "metrics.json").read_text())["eval"]
    assert [sorted(e) for e in evals] == [["step", "tokens"], ["forward", "reversal", "step", "tokens",
                                                                  "train_forward", "train_reversal"]]


def test_final_evaluation_is_stored_with_the_model(tmp_path):
    """The run evaluates its saved model as the page will (both protocols, held-out and SFT splits),
    keyed by the saved weights' fingerprint; the metadata names the preset, not the output folder."""
    from llada_app import poems
    from llada_app.loading import load_model

    out = train(_micro(tmp_path / "run", pretrain_steps=4, sft_steps=2, save_every=0, final_eval=True))
    meta = json.loads((out / "training_meta.json").read_text())
    assert meta["preset"] == "micro" and "output_dir" not in meta["config"] and str(tmp_path) not in json.dumps(meta)
    loaded = load_model(str(out), device="cpu")
    corpus = poems.PoemCorpus.for_card(loaded.card)
    decoding = poems.Decoding.for_model(loaded.card, corpus, loaded.tokenizer)
    stored = poems.stored_evaluation(out, poems.evaluation_key(loaded, decoding, poems.STORED_LIMITS))
    assert sorted((r.protocol, r.split) for r in stored) == [("chat", "heldout"), ("chat", "train"),
                                                            ("completion", "heldout")]
    held, sft = (len(poems.line_pairs(corpus.split(s))) for s in ("heldout", "train"))
    assert {r.split: r.n_pairs for r in stored} == {"heldout": held, "train": min(sft, 65)}


# ---------------------------------------------------------------------------------- faults

def _checkpointed(tmp_path, **kw):
    """A micro run that keeps its checkpoints (steps 5 and 10 of 10)."""
    cfg = _micro(tmp_path, pretrain_steps=10, sft_steps=0, save_every=5, keep_checkpoints=True, save_dtype="fp32", **kw)
    train(cfg)
    return cfg


def test_a_fresh_run_refuses_a_folder_holding_another_run(tmp_path):
    from llada_app.train import TrainingError

    cfg = _checkpointed(tmp_path)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(TrainingError, match="holds another run .*--resume.*--overwrite"):
        train(cfg)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before  # nothing deleted
    train(cfg, overwrite=True)  # on purpose


def test_resume_with_other_settings_is_refused_unless_accepted(tmp_path, capsys):
    from llada_app.train import TrainingError

    cfg = _checkpointed(tmp_path)
    longer = _micro(tmp_path, pretrain_steps=12, sft_steps=0, save_every=5, lr=0.01, save_dtype="fp32")
    with pytest.raises(TrainingError, match=r"other settings \(pretrain_steps: 10 -> 12; lr: .* -> 0.01\)"):
        train(longer, resume=True)
    train(longer, resume=True, accept_changes=True)
    history = json.loads((tmp_path / "metrics.json").read_text())
    meta = json.loads((tmp_path / "training_meta.json").read_text())
    assert history["config"] == meta["config"] and history["config"]["lr"] == 0.01  # the two files agree
    assert history["changes"][0]["step"] == 10 and "lr: 0.003 -> 0.01" in history["changes"][0]["changes"]
    assert history["train"][-1]["step"] == 12
    with pytest.raises(SystemExit):
        parse_args(["--accept-changes"])  # only with --resume
    assert cfg.pretrain_steps == 10


def test_resume_falls_back_to_the_older_checkpoint_when_the_newest_is_unreadable(tmp_path, capsys):
    from llada_app.train import TrainingError, _checkpoints

    cfg = _checkpointed(tmp_path)
    older, newest = _checkpoints(tmp_path)
    assert (older.name, newest.name) == ("step-0000005", "step-0000010")  # the last two are kept
    weights = next(newest.glob("model*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    cfg.pretrain_steps = 10
    train(cfg, resume=True)
    out = capsys.readouterr().out
    assert "skipped unreadable checkpoint(s) step-0000010" in out and "resuming from step-0000005" in out
    assert json.loads((tmp_path / "metrics.json").read_text())["train"][-1]["step"] == 10
    # no trainer_state.json in either: no silent start from scratch beside them
    cfg = _checkpointed(tmp_path / "again")
    for ckpt in _checkpoints(tmp_path / "again"):
        (ckpt / "trainer_state.json").unlink()
    with pytest.raises(TrainingError, match="no checkpoint .* reads back: step-0000010 .*step-0000005 .*--overwrite"):
        train(cfg, resume=True)


def test_a_full_disk_says_so(tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    from accelerate import Accelerator

    from llada_app.train import TrainingError

    def full(self, *a, **k):
        raise RuntimeError("basic_ios::clear: iostream error")  # what torch's writer says on ENOSPC

    monkeypatch.setattr(Accelerator, "save_state", full)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9, 1024))
    with pytest.raises(TrainingError, match="the disk is full .* --resume"):
        train(_micro(tmp_path, pretrain_steps=6, sft_steps=0, save_every=5))
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # no half checkpoint left


def test_checkpoints_are_ordered_by_step_number(tmp_path):
    from llada_app.train import _checkpoints

    for name in ("step-100", "step-9", "step-10", "notes", "step-x"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert [p.name for p in _checkpoints(tmp_path)] == ["step-9", "step-10", "step-100"]
