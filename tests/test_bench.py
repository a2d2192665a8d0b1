"""The benchmark runs end to end on a random tiny shape and reports consistent figures."""
import json

import pytest
import torch

from llada_app import bench


def test_bench_json_on_a_tiny_random_shape(capsys):
    bench.main(["--shape", "sonnets", "--gen-length", "16", "--block-length", "8", "--prompts", "2",
                "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--lengths", "3:6", "--json"])
    result = json.loads(capsys.readouterr().out)
    rows = {r["mode"]: r for r in result["rows"]}
    assert list(rows)[:6] == ["vanilla", "threshold", "prefix", "dual", "threshold+prefix", "threshold+dual"]
    assert "arm (KV cache)" in rows
    # candidates 3..6 side by side in the first block (one slot per step), the second block all padding,
    # then the page's re-scoring: 4 candidates x 2 prompts x 32 samples = 256 rows, one forward pass
    search = rows["length-search"]
    assert search["nfe"] == 6 + 1 and search["config"]["lengths"] == "3:6"
    assert search["config"]["likelihood_samples"] == 32
    # the fixed schedule: 8 tokens per block in 8 steps, one forward pass each, whatever the cache
    assert rows["vanilla"]["nfe"] == rows["prefix"]["nfe"] == rows["dual"]["nfe"] == 16
    assert all(rows[m]["nfe"] <= 16 for m in ("threshold", "threshold+prefix", "threshold+dual"))
    for r in rows.values():
        assert 0 < r["denoiser_s"] <= r["wall_s"]
    assert rows["arm (KV cache)"]["nfe"] <= 16
    table = bench.format_table(result)
    assert table.count("\n") == 2 + len(rows)


def test_bad_lengths_are_refused_by_the_command_line(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--shape", "sonnets", "--lengths", "8"])
    assert "answer lengths take MIN:MAX" in capsys.readouterr().err


def test_random_model_shapes():
    with pytest.raises(ValueError, match="unknown shape"):
        bench.random_model("2b", None, "cpu", torch.float32)


def test_agreement_is_measured_against_vanilla_on_the_same_prompts():
    """The agreement columns compare each mode's answers with vanilla's: recomputed here by running the
    sampler directly on the bench's own prompts (bundled model, held-out questions)."""
    from dataclasses import replace

    from llada_app.generation import generate, pad_prompts
    from llada_app.loading import DEFAULT_MODEL, load_model
    from llada_app.tokenization import chat_prompt_ids

    result = bench.run_bench(bench.parse_args(["--gen-length", "16", "--block-length", "8", "--prompts", "4",
                                               "--batch-size", "4", "--repeats", "1", "--warmup", "0", "--no-arm",
                                               "--modes", "threshold+dual", "--threshold", "0.5"]))
    rows = {r["mode"]: r for r in result["rows"]}
    loaded = load_model(DEFAULT_MODEL, device="cpu")
    prompts = bench.poem_prompts(4, loaded.card, "heldout")
    x, attn = pad_prompts([chat_prompt_ids(loaded.tokenizer, [{"role": "user", "content": p.question}])
                           for p in prompts], loaded.ids.pad)
    config = bench.mode_configs(16, 8, 0.5)["vanilla"]
    kw = dict(mask_id=loaded.ids.mask, eos_id=loaded.ids.eos, eot_id=loaded.ids.eot)
    vanilla = generate(bench.make_denoiser(loaded), x, attn, config, **kw)[:, x.shape[1]:]
    fast = generate(bench.make_denoiser(loaded), x, attn, replace(config, threshold=0.5, cache="dual"),
                    **kw)[:, x.shape[1]:]
    assert rows["threshold+dual"]["agree_tokens"] == pytest.approx(float((vanilla == fast).float().mean()))
    assert rows["threshold+dual"]["nfe"] < rows["vanilla"]["nfe"]  # a trained model reveals several per step


def test_compiled_rows_and_kernels_on_a_cpu(capsys):
    """--compile runs the modes through the captured path (same tokens as eager vanilla on vanilla's
    schedule); --kernels times single passes, and --onnx-layers one ONNX Runtime forward beside them."""
    bench.main(["--shape", "sonnets", "--no-arm", "--prompts", "1", "--prompt-length", "40", "--gen-length", "32",
                "--block-length", "16", "--modes", "vanilla", "threshold+dual", "--repeats", "1", "--warmup", "0",
                "--compile", "--kernels", "--kernel-length", "128", "--kernel-runs", "2", "--onnx-layers", "1",
                "--json"])
    result = json.loads(capsys.readouterr().out)
    rows = {r["mode"]: r for r in result["rows"]}
    assert result["prompt_length"] == 40 and result["compile_s"] > 0
    assert rows["compiled vanilla"]["agree_tokens"] == 1.0 and rows["compiled vanilla"]["nfe"] == 32
    assert rows["compiled threshold+dual"]["agree_tokens"] == rows["threshold+dual"]["agree_tokens"]
    kernels = {k["kernel"].split(",")[0]: k for k in result["kernels"]}
    assert set(kernels) == {"full forward L=128", "dual block step 16x72"}
    assert all(k["compiled_ms"] > 0 for k in result["kernels"])
    onnx = [k for k in result["kernels"] if "ORT" in k["kernel"]]
    assert len(onnx) == 1 and onnx[0]["onnx_ms"] > 0 and onnx[0]["providers"][0] == "CPUExecutionProvider"
    assert "| forward pass (batch 1) |" in bench.format_table(result)
