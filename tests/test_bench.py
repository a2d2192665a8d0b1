"""The benchmark runs end to end on a random tiny shape and reports consistent figures."""
import json

import pytest
import torch

from llada_app import bench


def test_bench_json_on_a_tiny_random_shape(capsys):
    bench.main(["--shape", "tiny", "--gen-length", "16", "--block-length", "8", "--prompts", "2",
                "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--lengths", "3:6", "--json"])
    result = json.loads(capsys.readouterr().out)
    rows = {r["mode"]: r for r in result["rows"]}
    assert list(rows)[:6] == ["vanilla", "threshold", "prefix", "dual", "threshold+prefix", "threshold+dual"]
    assert "arm (KV cache)" in rows
    # candidates 3..6 side by side in the first block (one slot per step), the second block all padding
    assert rows["length-search"]["nfe"] == 6 and rows["length-search"]["config"]["lengths"] == "3:6"
    assert rows["vanilla"]["nfe"] == 16 and rows["vanilla"]["agree_tokens"] == 1.0
    for r in rows.values():
        assert 0 < r["denoiser_s"] <= r["wall_s"]
        assert 1 <= r["nfe"] <= 16
    assert rows["arm (KV cache)"]["nfe"] <= 16
    table = bench.format_table(result)
    assert table.count("\n") == 2 + len(rows)


def test_bad_lengths_are_refused_by_the_command_line(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--shape", "tiny", "--lengths", "8"])
    assert "answer lengths take MIN:MAX" in capsys.readouterr().err


def test_random_model_shapes():
    with pytest.raises(ValueError, match="unknown shape"):
        bench.random_model("2b", None, "cpu", torch.float32)
