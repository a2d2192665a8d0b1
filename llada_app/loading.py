"""Load a LLaDA checkpoint (local folder or hub id) with this project's classes, from safetensors only."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from . import LLaDAModelLM  # noqa: F401  (registers the classes)
from .tokenization import EOS, EOT, MASK

BUNDLED_MODELS = Path(__file__).resolve().parent.parent / "assets" / "models"
DEFAULT_MODEL = str(BUNDLED_MODELS / "sonnets-mdm")


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be loaded; the message says why in plain words."""


@dataclass(frozen=True)
class SpecialIds:
    mask: int
    eos: int
    eot: int
    pad: int


@dataclass
class LoadedModel:
    model: LLaDAModelLM
    tokenizer: PreTrainedTokenizerBase
    ids: SpecialIds
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def describe(self) -> dict:
        cfg = self.model.config
        return dict(name=self.name, parameters=sum(p.numel() for p in self.model.parameters()),
                    device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
                    layers=cfg.n_layers, d_model=cfg.d_model, vocab=cfg.vocab_size,
                    context=cfg.max_sequence_length, causal=cfg.causal)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for, but no CUDA GPU is available")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def _looks_local(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name) or name.count("/") != 1


def _check_folder(folder: Path) -> None:
    """Fail early, in words, on the usual ways a checkpoint folder is broken."""
    from safetensors import safe_open

    if not folder.is_dir():
        raise ModelLoadError(f"model folder not found: {folder}")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{folder} has no config.json: not a model folder")
    try:
        model_type = json.loads(cfg_path.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON: {e}") from None
    if model_type != "llada":
        raise ModelLoadError(f"{folder} holds a {model_type!r} model, not a LLaDA model (model_type 'llada')")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
            hint = f" (found {pickled}: pickled weights are never loaded; convert to safetensors)" if pickled else ""
            raise ModelLoadError(f"weight file missing: {path}{hint}")
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types for bad headers/sizes
            raise ModelLoadError(f"weight file {path} is corrupt or truncated: {e}") from None


def load_model(name_or_path: str = DEFAULT_MODEL, device: str = "auto",
               dtype: str | torch.dtype | None = None) -> LoadedModel:
    """A folder laid out like GSAI-ML/LLaDA-8B-Instruct, or a hub id -> model, tokenizer and special ids.

    Weights go straight to `device` in `dtype` (bf16 on CUDA, fp32 on CPU by default) through
    meta-device initialisation, so an 8B checkpoint never exists as a full fp32 copy in RAM.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if _looks_local(name_or_path):
        _check_folder(Path(name_or_path).expanduser())
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
        if config.model_type != "llada":
            raise ModelLoadError(f"{name_or_path} holds a {config.model_type!r} model, not LLaDA")
        model = AutoModel.from_pretrained(
            name_or_path, config=config, dtype=torch_dtype, device_map=str(dev),
            use_safetensors=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except ModelLoadError:
        raise
    except OSError as e:  # hub id not found, offline, missing files
        raise ModelLoadError(f"could not load {name_or_path!r}: {e}") from None
    model.eval()
    return LoadedModel(model, tokenizer, special_ids(tokenizer, config), name=Path(name_or_path).name)


def special_ids(tokenizer: PreTrainedTokenizerBase, config) -> SpecialIds:
    vocab = tokenizer.get_vocab()
    if MASK not in vocab:
        raise ModelLoadError(f"the tokenizer has no mask token {MASK}: not a masked-diffusion tokenizer")
    mask = vocab[MASK]
    if getattr(config, "mask_token_id", mask) != mask:
        raise ModelLoadError(f"config mask_token_id {config.mask_token_id} != tokenizer's {MASK} id {mask}")
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else vocab.get(EOS)
    if eos is None:
        raise ModelLoadError(f"the tokenizer has no end-of-text token {EOS}")
    eot = vocab.get(EOT, eos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad == mask:
        raise ModelLoadError("the pad token must differ from the mask token")
    return SpecialIds(mask=mask, eos=eos, eot=eot, pad=pad)
