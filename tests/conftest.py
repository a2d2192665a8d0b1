"""Shared fixtures: a tiny random LLaDA checkpoint in the official layout, built in a temp folder."""
import pytest
import torch

import llada_app  # noqa: F401  (registers the classes)
from llada_app.modeling import LLaDAConfig, LLaDAModelLM
from llada_app.tokenization import train_bpe_tokenizer

TEXT = [
    "From fairest creatures we desire increase,",
    "That thereby beauty's rose might never die,",
    "But as the riper should by time decease,",
    "His tender heir might bear his memory:",
    "When forty winters shall besiege thy brow,",
    "And dig deep trenches in thy beauty's field,",
]


def tiny_config(tokenizer, **overrides) -> LLaDAConfig:
    kw = dict(d_model=64, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=128,
              vocab_size=len(tokenizer), embedding_size=len(tokenizer) + 8, max_sequence_length=256,
              rope_theta=10000.0, mask_token_id=tokenizer.mask_token_id,
              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    kw.update(overrides)
    return LLaDAConfig(**kw)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The models here are tiny: one intra-op thread is faster than two, and far faster than two
    threads fighting other processes for a 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_bpe_tokenizer(TEXT * 4, vocab_size=320)


@pytest.fixture(scope="session")
def ids(tiny_tokenizer):
    """The tiny tokenizer's special ids, as the sampler's keyword arguments (test_modeling's ids are others)."""
    t = tiny_tokenizer
    return dict(mask_id=t.mask_token_id, eos_id=t.eos_token_id, eot_id=t.convert_tokens_to_ids("<|eot_id|>"))


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    torch.manual_seed(0)
    return LLaDAModelLM(tiny_config(tiny_tokenizer)).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    """The tiny model saved like GSAI-ML/LLaDA-8B-Instruct: sharded safetensors + index, auto_map kept."""
    out = tmp_path_factory.mktemp("tiny-llada")
    tiny_model.config.auto_map = {"AutoConfig": "configuration_llada.LLaDAConfig",
                                  "AutoModel": "modeling_llada.LLaDAModelLM"}
    tiny_model.save_pretrained(out, max_shard_size="60KB")
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def app_models(tmp_path_factory, tiny_tokenizer):
    """(MDM dir, ARM dir, bundled?) for the app tests: the bundled checkpoints, else tiny random ones."""
    from ui_support import app_model_dirs

    return app_model_dirs(tmp_path_factory, tiny_tokenizer, tiny_config)
