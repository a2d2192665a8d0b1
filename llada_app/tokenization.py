"""Special tokens, the chat template, chat formatting and BPE tokenizer training.

The special-token names and the chat template follow LLaDA-8B-Instruct, so the bundled tiny model
and the official one are driven by the same code.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

BOS, EOS, MASK = "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, MASK, START_HEADER, END_HEADER, EOT]

# LLaMA-3 form, as shipped with LLaDA-8B-Instruct: BOS once, then one header + text + <|eot_id|> per
# turn; `add_generation_prompt` appends the assistant header the model answers after.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """[{"role", "content"}, ...] -> prompt token ids ending with the assistant header."""
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for m in messages:
        if not {"role", "content"} <= set(m) or m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"bad chat message {m!r}: need role system/user/assistant and content")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template already holds BOS; the tokenizer must not add another one.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_tokens(answer: Sequence[int], ids) -> list[int]:
    """Answer ids -> the tokens before the first EOS/EoT, masks dropped (`ids`: loading.SpecialIds)."""
    out = []
    for t in answer:
        if t in (ids.eos, ids.eot):
            break
        if t != ids.mask:
            out.append(t)
    return out


def decode_answer(tokenizer: PreTrainedTokenizerBase, answer: Sequence[int], ids) -> str:
    """Answer ids -> its text: what goes into the chat history and what the evaluations score."""
    return tokenizer.decode(answer_tokens(answer, ids), skip_special_tokens=True).strip()


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`, with the official special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS, mask_token=MASK,
        additional_special_tokens=[START_HEADER, END_HEADER, EOT], chat_template=CHAT_TEMPLATE,
        padding_side="left", clean_up_tokenization_spaces=False)
