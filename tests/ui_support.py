"""Shared by the UI tests: which models the app runs with, a free port, reading the chat endpoint's output.

The UI tests run the app with the bundled checkpoints when they exist (so the final suite tests the
real thing) and otherwise with a tiny random MDM and its causal twin saved to a temp folder.
"""
from __future__ import annotations

import html
import re
import socket
from pathlib import Path

import torch

from llada_app.loading import DEFAULT_ARM, DEFAULT_MODEL
from llada_app.modeling import LLaDAModelLM
from llada_app.studio import mask_count


def bundled_models_present() -> bool:
    return all((Path(d) / "config.json").is_file() for d in (DEFAULT_MODEL, DEFAULT_ARM))


def app_model_dirs(tmp_path_factory, tokenizer, config_factory) -> tuple[str, str, bool]:
    """-> (mdm dir, arm dir, bundled?)."""
    if bundled_models_present():
        return DEFAULT_MODEL, DEFAULT_ARM, True
    root = tmp_path_factory.mktemp("ui-models")
    for name, causal, seed in (("mdm", False, 0), ("arm", True, 1)):
        torch.manual_seed(seed)
        model = LLaDAModelLM(config_factory(tokenizer, causal=causal)).eval()
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return str(root / "mdm"), str(root / "arm"), False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def message_text(message: dict) -> str:
    """A chatbot message as gradio_client returns it (content: str or a list of parts) -> its text."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def strip_tags(page: str) -> str:
    """The text a page shows: tags dropped, line breaks kept, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.replace("<br>", "\n")))
