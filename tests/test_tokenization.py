"""Chat formatting against the exact token sequence of the LLaDA-8B-Instruct template"""
import pytest

from llada_app.tokenization import (BOS, CHAT_TEMPLATE, EOS, EOT, MASK, SPECIAL_TOKENS, chat_prompt_ids,
                                     train_bpe_tokenizer)


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


def test_trained_tokenizer_round_trips_text_and_keeps_the_special_tokens():
    """Byte-level BPE: any text (characters it never saw included) decodes back exactly, with no
    space added in front or cleaned up around punctuation; the specials are single tokens at ids 0..5,
    the vocabulary has the size asked for, and padding goes on the left (the sampler's batches)."""
    tok = train_bpe_tokenizer(["Shall I compare thee to a summer's day?\n"] * 8, vocab_size=270)
    assert len(tok) == 270
    for text in ("Shall I compare thee", "a , b ! 'tis", "床前明月光，疑是地上霜。", "  two  spaces\n"):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.mask_token) == (BOS, EOS, EOS, MASK)
    assert tok.padding_side == "left" and tok.clean_up_tokenization_spaces is False
    assert tok.chat_template == CHAT_TEMPLATE and EOT in tok.all_special_tokens
    system = chat_prompt_ids(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert "Be brief." in tok.decode(system)
    assert tok(BOS + "Shall", add_special_tokens=False)["input_ids"][0] == tok.convert_tokens_to_ids(BOS)
