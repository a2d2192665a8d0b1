"""Chat formatting against the exact token sequence of the LLaDA-8B-Instruct template"""
import pytest

from llada_app.tokenization import chat_prompt_ids


def test_two_turn_conversation_matches_template(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [
        {"role": "user", "content": "From fairest creatures"},
        {"role": "assistant", "content": "we desire increase"},
        {"role": "user", "content": "And then?"},
    ]
    ids = chat_prompt_ids(tok, messages)

    def sp(name):
        return [tok.convert_tokens_to_ids(name)]

    def text(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    def turn(role, content):
        return sp("<|start_header_id|>") + text(role) + sp("<|end_header_id|>") + text("\n\n" + content) + sp("<|eot_id|>")

    expected = (sp("<|startoftext|>") + turn("user", "From fairest creatures")
                + turn("assistant", "we desire increase") + turn("user", "And then?")
                + sp("<|start_header_id|>") + text("assistant") + sp("<|end_header_id|>") + text("\n\n"))
    assert ids == expected
    assert ids.count(tok.convert_tokens_to_ids("<|startoftext|>")) == 1  # BOS once
    assert tok.decode(ids) == (
        "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nFrom fairest creatures<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nwe desire increase<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd then?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_bad_conversations_are_refused(tiny_tokenizer):
    with pytest.raises(ValueError, match="at least one message"):
        chat_prompt_ids(tiny_tokenizer, [])
    with pytest.raises(ValueError, match="bad chat message"):
        chat_prompt_ids(tiny_tokenizer, [{"role": "robot", "content": "hi"}])
