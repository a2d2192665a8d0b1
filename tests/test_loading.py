"""Loading checkpoints in the official layout, and the clear errors for broken ones."""
import json

import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM

from llada_app.loading import ModelLoadError, load_model
from llada_app.modeling import LLaDAModelLM


@pytest.fixture
def bf16_dir(tmp_path, tiny_model, tiny_tokenizer):
    """A bf16 checkpoint, sharded with an index, auto_map left in config.json (as the official one)."""
    model = LLaDAModelLM(tiny_model.config)
    model.load_state_dict(tiny_model.state_dict())
    model.config.auto_map = {"AutoConfig": "configuration_llada.LLaDAConfig",
                             "AutoModel": "modeling_llada.LLaDAModelLM"}
    model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="60KB")
    tiny_tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_official_layout_round_trips_through_automodel(bf16_dir, tiny_model):
    cfg = json.loads((bf16_dir / "config.json").read_text())
    assert "auto_map" in cfg and cfg["model_type"] == "llada"
    index = json.loads((bf16_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert not list(bf16_dir.glob("*.py"))  # no remote code to run, and none is needed

    model = AutoModel.from_pretrained(bf16_dir)  # trust_remote_code left at its default
    assert type(model) is LLaDAModelLM and model.dtype == torch.bfloat16
    assert type(AutoModelForMaskedLM.from_pretrained(bf16_dir)) is LLaDAModelLM
    ids = torch.randint(0, 300, (2, 10))
    reference = LLaDAModelLM(tiny_model.config)
    reference.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference.to(torch.bfloat16)(ids).logits)


def test_load_model_gives_model_tokenizer_and_special_ids(bf16_dir, tiny_tokenizer):
    loaded = load_model(str(bf16_dir), device="cpu")
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"  # fp32 on CPU by default
    assert loaded.ids.mask == tiny_tokenizer.convert_tokens_to_ids("<|mdm_mask|>")
    assert loaded.ids.eos == tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert loaded.ids.eot == tiny_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert loaded.ids.pad != loaded.ids.mask
    assert load_model(str(bf16_dir), device="cpu", dtype="bf16").dtype == torch.bfloat16
    info = loaded.describe()
    c = loaded.model.config  # the architecture's count: embeddings, LM head, final norm, per block 2 norms,
    kv = c.n_kv_heads * c.head_dim  # q/out d x d, k/v d x kv, SwiGLU 3 x d x hidden
    per_block = 2 * c.d_model + 2 * c.d_model ** 2 + 2 * c.d_model * kv + 3 * c.d_model * c.mlp_hidden_size
    assert info["parameters"] == 2 * c.embedding_size * c.d_model + c.d_model + c.n_layers * per_block
    assert info["causal"] is False


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nope"), device="cpu")


def test_missing_weight_file(bf16_dir):
    next(bf16_dir.glob("model-0000*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match="weight file missing"):
        load_model(str(bf16_dir), device="cpu")


def test_pickled_weights_are_refused(tmp_path, tiny_model, tiny_tokenizer):
    tiny_model.config.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="pickled weights are never loaded"):
        load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weight_file(bf16_dir, damage):
    shard = sorted(bf16_dir.glob("model-0000*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(str(bf16_dir), device="cpu")


def test_not_a_llada_model(bf16_dir):
    cfg = json.loads((bf16_dir / "config.json").read_text())
    cfg["model_type"] = "llama"
    (bf16_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="not a LLaDA model"):
        load_model(str(bf16_dir), device="cpu")


def test_tokenizer_without_mask_token(bf16_dir, tiny_tokenizer):
    vocab_file = bf16_dir / "tokenizer.json"
    data = json.loads(vocab_file.read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|mdm_mask|>"]
    data["model"]["vocab"].pop("<|mdm_mask|>")
    vocab_file.write_text(json.dumps(data))
    cfg = json.loads((bf16_dir / "tokenizer_config.json").read_text())
    cfg.pop("mask_token", None)
    cfg.get("added_tokens_decoder", {}).pop(str(tiny_tokenizer.mask_token_id), None)
    (bf16_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="no mask token"):
        load_model(str(bf16_dir), device="cpu")


def test_cuda_asked_without_gpu(bf16_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        load_model(str(bf16_dir), device="cuda")


def test_unknown_hub_id_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model("no-such-org/no-such-model", device="cpu")
