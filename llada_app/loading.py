"""Load a LLaDA checkpoint (local folder or hub id) with this project's classes, from safetensors only.

`load_model` returns a `LoadedModel`: the module, its tokenizer and its `ModelCard`, the one
description of the model that the app, the evaluation, the benchmark and the trainer's eval read
(special ids, causal or not, chat or base model, shape, what it was trained on).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from . import LLaDAModelLM  # noqa: F401  (registers the classes)
from .modeling import SHAPES
from .tokenization import EOS, EOT, MASK

BUNDLED_MODELS = Path(__file__).resolve().parent.parent / "assets" / "models"
DEFAULT_MODEL = str(BUNDLED_MODELS / "sonnets-mdm")
DEFAULT_ARM = str(BUNDLED_MODELS / "sonnets-arm")  # the bundled model's autoregressive twin
DEFAULT_BASE = str(BUNDLED_MODELS / "sonnets-mdm-base")  # its pre-trained base (the completion protocol)
TRAINING_META = "training_meta.json"  # written by llada_app.train into each model folder it saves


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be loaded; the message says why in plain words."""


@dataclass(frozen=True)
class SpecialIds:
    mask: int
    eos: int
    eot: int
    pad: int


@dataclass(frozen=True)
class ModelCard:
    """What the rest of the project knows about a model, read once from its config, tokenizer and
    training_meta.json."""

    name: str
    ids: SpecialIds
    causal: bool  # an autoregressive model (the ARM twin): it decodes left to right
    chat: bool  # it answers through the chat template (instruct / fine-tuned); False: a base model
    shape: str | None  # the modeling.SHAPES entry its config matches (None: none of them)
    training: dict = field(default_factory=dict)  # training_meta.json of a model trained here ({}: none)
    chinese: bool = False  # its tokenizer has Chinese words (LLaDA-8B), not only bytes (a sonnets BPE)

    @property
    def trained_here(self) -> bool:
        return bool(self.training)

    @property
    def preset(self) -> str | None:
        return self.training.get("preset")

    @property
    def n_sonnets(self) -> int | None:
        """Corpus of a model trained here: the first N sonnets (the last sixth held out of SFT)."""
        return self.training.get("n_sonnets")

    @property
    def answer_slots(self) -> int | None:
        """The answer length (answer + EOS padding) its fine-tuning used, if trained here."""
        return self.training.get("config", {}).get("answer_slots")

    @classmethod
    def build(cls, name: str, tokenizer: PreTrainedTokenizerBase, config, training: dict | None = None) -> "ModelCard":
        training = training or {}
        stage = training.get("config", {}).get("stage")
        # A pre-trained-only run, or a checkpoint named like LLaDA-8B-Base, is a base model: it completes
        # text, it was never taught to answer questions.
        chat = tokenizer.chat_template is not None and stage != "pretrain" and "base" not in name.lower().split("-")
        probe = "床前明月光"  # 5 characters, 15 bytes
        chinese = len(tokenizer(probe, add_special_tokens=False)["input_ids"]) <= len(probe)
        return cls(name=name, ids=special_ids(tokenizer, config), causal=bool(getattr(config, "causal", False)),
                   chat=chat, shape=shape_name(config), training=training, chinese=chinese)


def shape_name(config) -> str | None:
    """The SHAPES entry whose every field the config has (None: another shape)."""
    for name, shape in SHAPES.items():
        if all(getattr(config, k, None) == v for k, v in shape.items()):
            return name
    return None


def model_fingerprint(model: LLaDAModelLM) -> str:
    """A short hash of the config and the weights (names, shapes and an evenly strided sample of up to
    4096 values per tensor), so that re-hashing an 8B model takes seconds, not minutes. Two different
    trainings of the same shape differ in every sampled value, so they never collide. ONNX exports and
    stored evaluations are keyed by it."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "auto_map", "torch_dtype", "dtype",
                     "architectures"):
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            # bf16-rounded: the same checkpoint loaded in fp32, fp16 or bf16 hashes alike
            sample = flat[::step][:4096].to(torch.bfloat16).float().cpu()
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class LoadedModel:
    model: LLaDAModelLM
    tokenizer: PreTrainedTokenizerBase
    card: ModelCard
    folder: Path | None = None  # the local folder it was loaded from (None: a hub id or built in memory)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def ids(self) -> SpecialIds:
        return self.card.ids

    @cached_property
    def fingerprint(self) -> str:
        return model_fingerprint(self.model)

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


def read_json_object(path: Path, what: str, error: type[Exception] = ModelLoadError) -> dict:
    """A JSON object stored in a model or export folder, or `error` saying what is wrong with it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({what}): {e}") from None
    except OSError as e:
        raise error(f"{path} cannot be read ({what}): {e}") from None
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object ({what}), not a {type(value).__name__}")
    return value


def _check_folder(folder: Path) -> None:
    """Fail early, in words, on the usual ways a checkpoint folder is broken."""
    from safetensors import safe_open

    if not folder.is_dir():
        raise ModelLoadError(f"model folder not found: {folder}")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{folder} has no config.json: not a model folder")
    config = read_json_object(cfg_path, "the model config")
    if config.get("model_type") != "llada":
        raise ModelLoadError(f"{folder} holds a {config.get('model_type')!r} model, not a LLaDA model "
                             "(model_type 'llada')")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, "the shard index")
        if not isinstance(weight_map.get("weight_map"), dict):
            raise ModelLoadError(f"{index} has no weight_map: not a safetensors shard index")
        shards = sorted(set(weight_map["weight_map"].values()))
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
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelLoadError(f"{folder} has no tokenizer (tokenizer.json): copy the model's tokenizer files into it")


def _check_weights(model: LLaDAModelLM, info: dict, where: str) -> None:
    """Every tensor the architecture needs, none it does not, each of the right shape, all finite:
    anything else would run a half-random or broken model without a word."""
    problems = []
    for what, keys in (("missing", info.get("missing_keys")), ("unexpected", info.get("unexpected_keys"))):
        if keys:
            problems.append(f"{what} tensors: {', '.join(sorted(keys)[:5])}{' …' if len(keys) > 5 else ''}")
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        shown = [f"{m[0]} {tuple(m[1])} in the file, {tuple(m[2])} expected" if isinstance(m, tuple | list) else str(m)
                 for m in list(mismatched)[:5]]
        problems.append("tensors of the wrong shape: " + "; ".join(shown))
    if problems:
        raise ModelLoadError(f"{where} does not match the model its config.json describes: " + " · ".join(problems))
    with torch.no_grad():
        bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise ModelLoadError(f"{where} has non-finite weights (NaN or inf) in {', '.join(bad[:5])}"
                             f"{' …' if len(bad) > 5 else ''}: the checkpoint is corrupt")


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
    except OSError as e:  # hub id not found, offline, missing files
        raise ModelLoadError(f"could not load {name_or_path!r}: {e}") from None
    except (ValueError, TypeError, KeyError) as e:  # a config.json transformers cannot build a config from
        raise ModelLoadError(f"the config of {name_or_path!r} is not a valid LLaDA config: {e}") from None
    if config.model_type != "llada":
        raise ModelLoadError(f"{name_or_path} holds a {config.model_type!r} model, not LLaDA")
    try:
        model, info = AutoModel.from_pretrained(
            name_or_path, config=config, dtype=torch_dtype, device_map=str(dev), use_safetensors=True,
            trust_remote_code=False, ignore_mismatched_sizes=True, output_loading_info=True)
    except OSError as e:
        raise ModelLoadError(f"could not load the weights of {name_or_path!r}: {e}") from None
    _check_weights(model, info, str(name_or_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001  (tokenizers raises plain Exception for a broken tokenizer.json)
        raise ModelLoadError(f"the tokenizer of {name_or_path!r} cannot be read: {type(e).__name__}: "
                             f"{str(e).strip()[:200]}") from None
    model.eval()
    folder = Path(name_or_path).expanduser() if _looks_local(name_or_path) else None
    training = _read_training_meta(folder) if folder is not None else {}
    card = ModelCard.build(Path(name_or_path).name, tokenizer, config, training)
    return LoadedModel(model, tokenizer, card, folder)


def _read_training_meta(folder: Path) -> dict:
    path = folder / TRAINING_META
    return read_json_object(path, "the training metadata") if path.is_file() else {}


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
