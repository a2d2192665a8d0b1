"""Denoisers: the one interface through which the sampler runs a model's forward pass.

A denoiser maps token ids (plus an optional key padding mask and K/V cache) to logits. The sampler
in `generation.py` only ever calls this interface, so the PyTorch module and an ONNX Runtime session
are interchangeable behind it. (The exporter, `export/`, builds on this module, never the reverse:
`export.onnx_export.onnx_denoiser` exports a model and opens its OnnxDenoiser.)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .loading import read_json_object
from .modeling import KV, LLaDAModelLM


@dataclass
class DenoiserOutput:
    logits: torch.Tensor  # [B, T', V] for the query positions selected by logits_slice
    past_key_values: tuple[KV, ...] | None = None  # per layer (k, v) [B, n_kv, S, hd], with use_cache


class Denoiser(Protocol):
    name: str  # "torch" or "onnx", shown in the UI
    device: torch.device
    supports_cache: bool  # False: the prefix/dual cache modes are unavailable
    max_length: int  # longest sequence the model accepts
    causal: bool  # an autoregressive model (the ARM twin): only the autoregressive decoder runs it
    deferred_sync: bool  # the sampler reads its block-done flag one step late (never waits on the device)

    def __call__(
        self,
        input_ids: torch.Tensor,  # [B, T] ids at positions start .. start+T-1
        attention_mask: torch.Tensor | None = None,  # [B, S] over keys; 0 = padding
        *,
        past_key_values: tuple[KV, ...] | None = None,  # see modeling.py for the cache rule
        use_cache: bool = False,
        start: int = 0,
        logits_slice: slice | None = None,  # which query positions need logits (None: all)
    ) -> DenoiserOutput: ...


class TorchDenoiser:
    """The PyTorch module, eager, under inference mode."""

    name = "torch"
    supports_cache = True
    deferred_sync = False

    def __init__(self, model: LLaDAModelLM):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.max_length = model.config.max_sequence_length
        self.causal = bool(model.config.causal)

    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask=None, *, past_key_values=None, use_cache=False,
                 start=0, logits_slice=None) -> DenoiserOutput:
        out = self.model(input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                         use_cache=use_cache, start=start, logits_slice=logits_slice)
        return DenoiserOutput(out.logits, out.past_key_values)


class OnnxBackendError(RuntimeError):
    """An ONNX export that cannot serve this model, or an ONNX Runtime set-up problem; says why."""


_ORT_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
               "tensor(bfloat16)": torch.bfloat16}
_OPT_LEVELS = ("disable", "basic", "extended", "all")
# Shapes in config.json that must agree between the export and the model it serves.
_MATCHED_FIELDS = {"vocab_size": "vocabulary size", "embedding_size": "embedding (logits) size",
                   "d_model": "hidden size", "n_layers": "number of layers", "n_heads": "number of heads",
                   "n_kv_heads": "number of K/V heads", "causal": "causal flag"}


class OnnxDenoiser:
    """An export folder of `python -m export` run by ONNX Runtime, behind the same interface.

    CPU: the CPU execution provider, numpy in and out (shared memory with the torch tensors).
    CUDA: the CUDA execution provider — an error, never a silent CPU fallback, when it cannot be
    created — with IO binding, so ids, K/V and logits stay on the GPU between steps.
    `io_binding=True` runs that same IO-binding code on a CPU too (ONNX Runtime reads and writes torch's
    buffers in place), which is how it is tested on a machine without a GPU.
    The cache modes use the folder's `model_with_past.onnx`; without it `supports_cache` is False.
    Only the generic graph optimiser of ONNX Runtime runs (levels disable/basic/extended/all); the
    causal-attention fusion presets of `onnxruntime.transformers` are never applied.
    """

    name = "onnx"
    deferred_sync = False  # its IO-binding run waits for torch's stream anyway

    def __init__(self, folder, *, device: str | torch.device = "cpu", expect_config=None, tokenizer=None,
                 fingerprint: str | None = None, threads: int | None = None, optimization: str = "all",
                 io_binding: bool | None = None):
        import onnxruntime as ort

        self.folder = Path(folder).expanduser()
        self.device = torch.device(device)
        self.io_binding = self.device.type == "cuda" if io_binding is None else io_binding  # always on a GPU
        if self.device.type == "cuda" and not self.io_binding:
            raise OnnxBackendError("on cuda the ONNX back end always runs with IO binding (the tensors stay on "
                                   "the GPU)")
        self.config, self.manifest = _read_export_folder(self.folder)
        if expect_config is not None:
            _match_config(self.folder, self.config, expect_config)
        if fingerprint is not None and "fingerprint" not in self.manifest:
            raise OnnxBackendError(f"{self.folder} has no onnx_export.json with the fingerprint of the weights it "
                                   "was exported from, so it cannot be checked against the loaded model; export "
                                   "this model again")
        if fingerprint is not None and self.manifest["fingerprint"] != fingerprint:
            raise OnnxBackendError(
                f"{self.folder} was exported from other weights (fingerprint {self.manifest['fingerprint']}, "
                f"the loaded model has {fingerprint}); export this model again")
        if tokenizer is not None:
            _match_tokenizer(self.folder, tokenizer)
        if optimization not in _OPT_LEVELS:
            raise OnnxBackendError(f"unknown optimisation level {optimization!r}; use one of {_OPT_LEVELS}")

        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        # ORT's pool threads busy-wait after each run by default; on a CPU shared with torch (the ARM
        # twin, or the other model in a benchmark) that spinning takes the cores torch needs next.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3  # errors only; ORT's warnings about unused initialisers are noise
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise OnnxBackendError("device cuda was asked for, but this onnxruntime build has no "
                                       "CUDAExecutionProvider (install onnxruntime-gpu)")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        elif self.device.type == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise OnnxBackendError(f"the ONNX back end runs on cpu or cuda, not {self.device}")

        self.session = _open_session(self.folder / "model.onnx", opts, providers)
        self.providers = self.session.get_providers()
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in self.providers:
            # ORT falls back to CPU without a word when the CUDA/cuDNN libraries fail to load.
            raise OnnxBackendError(
                f"ONNX Runtime could not create the CUDA execution provider (session providers: "
                f"{self.providers}); check that the CUDA and cuDNN libraries onnxruntime-gpu needs are installed")
        past_file = self.folder / "model_with_past.onnx"
        self.past_session = _open_session(past_file, opts, providers) if past_file.is_file() else None
        self.supports_cache = self.past_session is not None
        self._check_graph(expect_config)
        self.max_length = self.config["max_sequence_length"]
        self._ones: torch.Tensor | None = None  # _all_keys
        self.causal = bool(self.config.get("causal", False))  # the ARM twin exports with causal=True
        self._n_layers, self._n_kv, self._head_dim = (
            self.config["n_layers"], self.config.get("n_kv_heads") or self.config["n_heads"],
            self.config["d_model"] // self.config["n_heads"])
        self._past_inputs, self._presents = past_names(self._n_layers)

    def _check_graph(self, expect_config) -> None:
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = self.session.get_outputs()
        if inputs != ["input_ids", "attention_mask"] or outputs[0].name != "logits":
            raise OnnxBackendError(f"{self.folder / 'model.onnx'} is not a denoiser graph: inputs {inputs}, "
                                   f"outputs {[o.name for o in outputs]} (want input_ids, attention_mask -> logits)")
        self.dtype = _ORT_DTYPES.get(outputs[0].type)
        if self.dtype is None or (self.dtype == torch.bfloat16):
            raise OnnxBackendError(f"logits of type {outputs[0].type} are not supported by this back end "
                                   "(export fp32 for CPUs, fp16 for GPUs)")
        vocab = outputs[0].shape[-1]
        want = (expect_config.embedding_size if expect_config is not None else self.config["embedding_size"])
        if vocab != want:
            raise OnnxBackendError(f"{self.folder / 'model.onnx'} produces {vocab} logits per position, "
                                   f"the model has {want}: the graph belongs to another model")
        d_model = _graph_hidden_size(self.folder / "model.onnx")
        want = expect_config.d_model if expect_config is not None else self.config["d_model"]
        if d_model is not None and d_model != want:
            raise OnnxBackendError(f"{self.folder / 'model.onnx'} has hidden size {d_model}, the model has "
                                   f"{want}: the graph belongs to another model")

    def __call__(self, input_ids, attention_mask=None, *, past_key_values=None, use_cache=False,
                 start=0, logits_slice=None) -> DenoiserOutput:
        B, T = input_ids.shape
        V = self.config["embedding_size"]
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        S = max(start + T, past_len)  # number of keys, as in modeling.py
        if S > self.max_length:
            raise ValueError(f"sequence of {S} tokens exceeds max_sequence_length {self.max_length}")
        if attention_mask is None:
            attention_mask = self._all_keys(B, S, input_ids.device)
        elif attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)}")
        feeds = {"input_ids": input_ids.long(), "attention_mask": attention_mask.long()}
        if past_key_values is None and not use_cache:
            if start != 0:
                raise ValueError("start > 0 needs past_key_values for the positions before it")
            logits, = self._run(self.session, feeds, {"logits": (B, T, V)}, cpu_feeds={})
            presents = None
        else:
            if self.past_session is None:
                raise OnnxBackendError(f"{self.folder} has no K/V-cache graph (model_with_past.onnx); "
                                       "use cache='none' or export again with the cache variant")
            if past_key_values is None and start != 0:
                raise ValueError("start > 0 needs past_key_values for the positions before it")
            if past_key_values is not None and len(past_key_values) != self._n_layers:
                raise ValueError(f"past_key_values has {len(past_key_values)} layers, model has {self._n_layers}")
            if past_len < start and past_key_values is not None:
                raise ValueError(f"the cache covers {past_len} positions, but the queries start at {start}")
            kv_shape = (B, self._n_kv, S, self._head_dim)
            pasts = ([None] * len(self._past_inputs) if past_key_values is None
                     else [t for kv in past_key_values for t in kv])  # key, value per layer
            for name, past in zip(self._past_inputs, pasts):
                feeds[name] = self._full_length_past(past, kv_shape, input_ids.device)
            wanted = {"logits": (B, T, V)}
            if use_cache:  # only fetched when asked for (a dual-cache block step reads the logits only)
                wanted.update(dict.fromkeys(self._presents, kv_shape))
            outs = self._run(self.past_session, feeds, wanted, cpu_feeds={"start": start})
            logits = outs[0]
            presents = tuple((outs[1 + 2 * i], outs[2 + 2 * i]) for i in range(self._n_layers)) if use_cache else None
        if logits_slice is not None:
            logits = logits[:, logits_slice]
        return DenoiserOutput(logits, presents)

    def _all_keys(self, B: int, S: int, device) -> torch.Tensor:
        """A mask of ones [B, S], reused while the shape holds (a dual-cache answer asks for the same one
        at every step); it is only ever read, by the graph."""
        ones = self._ones
        if ones is None or ones.shape != (B, S) or ones.device != torch.device(device):
            self._ones = ones = torch.ones(B, S, dtype=torch.long, device=device)
        return ones

    def _full_length_past(self, past: torch.Tensor | None, shape, device) -> torch.Tensor:
        """The cache padded with zero slots to S keys (the graph overwrites the query slots)."""
        if past is None:
            return torch.zeros(shape, dtype=self.dtype, device=device)
        if past.dtype != self.dtype:
            past = past.to(self.dtype)
        missing = shape[2] - past.shape[2]
        if missing:
            pad = torch.zeros(*shape[:2], missing, shape[3], dtype=self.dtype, device=past.device)
            past = torch.cat([past, pad], dim=2)
        return past

    def _run(self, session, feeds: dict, outputs: dict, cpu_feeds: dict) -> list[torch.Tensor]:
        """One session run; `outputs` maps names to shapes; `cpu_feeds` are host scalars (int64)."""
        if not self.io_binding:  # a CPU: numpy views of the torch tensors in, numpy arrays out
            arrays = {k: _as_numpy(v) for k, v in feeds.items()}
            arrays.update({k: np.asarray(v, dtype=np.int64) for k, v in cpu_feeds.items()})
            return [torch.from_numpy(a) for a in session.run(list(outputs), arrays)]
        # IO binding: ONNX Runtime reads torch's buffers in place and writes into outputs allocated by
        # torch (on a GPU its caching allocator makes per-step allocation cheap).
        kind, index = self.device.type, self.device.index or 0
        binding = session.io_binding()
        keep = []  # the bound tensors must outlive the run
        for name, t in feeds.items():
            t = t.to(self.device).contiguous()
            keep.append(t)
            binding.bind_input(name, kind, index, _numpy_dtype(t.dtype), tuple(t.shape), t.data_ptr())
        for name, value in cpu_feeds.items():
            keep.append(np.asarray(value, dtype=np.int64))
            binding.bind_cpu_input(name, keep[-1])
        results = []
        for name, shape in outputs.items():
            o = torch.empty(shape, dtype=self.dtype, device=self.device)
            results.append(o)
            binding.bind_output(name, kind, index, _numpy_dtype(o.dtype), tuple(shape), o.data_ptr())
        if kind == "cuda":  # ORT runs on its own CUDA stream: let torch's pending work on the inputs finish first
            torch.cuda.current_stream(self.device).synchronize()
        session.run_with_iobinding(binding)
        return results


def past_names(n_layers: int) -> tuple[list[str], list[str]]:
    """Optimum's names for the cache graph's inputs and outputs, key then value per layer."""
    inputs = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    outputs = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return inputs, outputs


def _as_numpy(t: torch.Tensor):
    """A CPU tensor's memory as a numpy array (no copy when it is contiguous, as the cache always is)."""
    if t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad:
        return t.numpy()
    return t.detach().cpu().contiguous().numpy()


def _numpy_dtype(dtype: torch.dtype):
    return {torch.int64: np.int64, torch.float32: np.float32, torch.float16: np.float16}[dtype]


def _read_export_folder(folder: Path) -> tuple[dict, dict]:
    """config.json and onnx_export.json of an export folder, with a clear error for what is missing."""
    if not folder.is_dir():
        raise OnnxBackendError(f"ONNX export folder not found: {folder}")
    if not (folder / "model.onnx").is_file():
        raise OnnxBackendError(f"{folder} has no model.onnx: not an ONNX export (run python -m export)")
    if not (folder / "config.json").is_file():
        raise OnnxBackendError(f"{folder} has no config.json next to model.onnx")
    config = read_json_object(folder / "config.json", "the model config", OnnxBackendError)
    if config.get("model_type") != "llada":
        raise OnnxBackendError(f"{folder} holds a {config.get('model_type')!r} export, not a LLaDA model")
    manifest_path = folder / "onnx_export.json"
    manifest = read_json_object(manifest_path, "the export manifest", OnnxBackendError) if manifest_path.is_file() else {}
    return config, manifest


def _match_config(folder: Path, config: dict, expect) -> None:
    for field, words in _MATCHED_FIELDS.items():
        have, want = config.get(field), getattr(expect, field)
        if field == "n_kv_heads":
            have = have or config.get("n_heads")
        if have != want:
            raise OnnxBackendError(f"{folder} was exported from a model with {words} {have}, but the loaded "
                                   f"model has {want}: this export belongs to another model")


def _match_tokenizer(folder: Path, tokenizer) -> None:
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise OnnxBackendError(f"{folder} has no tokenizer files (tokenizer.json); export the model again")
    try:
        theirs = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # tokenizers raises plain Exception for a broken tokenizer.json
        raise OnnxBackendError(f"the tokenizer in {folder} cannot be read: {e}") from None
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise OnnxBackendError(f"the tokenizer in {folder} ({len(theirs)} tokens) differs from the loaded "
                               f"model's ({len(tokenizer)} tokens): this export belongs to another model")


def _open_session(path: Path, opts, providers):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # ORT raises InvalidProtobuf / Fail / RuntimeException for broken files
        if "NOT_IMPLEMENTED" in str(e):
            raise OnnxBackendError(
                f"ONNX Runtime has no kernel for an operator of {path} on {providers}: {str(e).strip()[:200]} "
                "(bf16 graphs run on very few ORT kernels: export fp32 for CPUs, fp16 for GPUs)") from None
        raise OnnxBackendError(f"{path} is corrupt or unreadable by ONNX Runtime: {type(e).__name__}: "
                               f"{str(e).strip()[:300]}") from None


def _graph_hidden_size(path: Path) -> int | None:
    """d_model from the embedding table's shape in the graph (weights are not read)."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:
        raise OnnxBackendError(f"{path} is corrupt: {e}") from None
    for init in graph.initializer:
        if init.name.endswith("wte.weight") and len(init.dims) == 2:  # the embedding table
            return int(init.dims[1])
    return None
