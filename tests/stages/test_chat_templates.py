"""Named chat templates: rendering, generation prompts, assistant masks (TRL's assistant_only_loss)."""

from __future__ import annotations

import pytest

from stages.chat_templates import TEMPLATES, apply_chat_template_choice
from stages.tiny_base import build_char_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "47+38="},
    {"role": "assistant", "content": "85"},
    {"role": "user", "content": "10+10="},
    {"role": "assistant", "content": "20"},
]

EXPECTED = {
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n47+38=<|im_end|>\n"
        "<|im_start|>assistant\n85<|im_end|>\n<|im_start|>user\n10+10=<|im_end|>\n"
        "<|im_start|>assistant\n20<|im_end|>\n"
    ),
    "alpaca": (
        "Be brief.\n\n### Instruction:\n47+38=\n\n### Response:\n85<|im_end|>\n\n"
        "### Instruction:\n10+10=\n\n### Response:\n20<|im_end|>\n\n"
    ),
    "vicuna": "Be brief.\n\nUSER: 47+38=\nASSISTANT: 85<|im_end|>\nUSER: 10+10=\nASSISTANT: 20<|im_end|>\n",
}


@pytest.fixture
def tokenizer():
    return build_char_tokenizer()


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_renders_system_and_multi_turn(tokenizer, name):
    apply_chat_template_choice(tokenizer, name)
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_generation_prompt_is_prefix_of_the_answered_turn(tokenizer, name):
    apply_chat_template_choice(tokenizer, name)
    prompt = tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    without = tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False)
    assert prompt != without
    assert full.startswith(prompt)
    assert full[len(prompt) :].startswith("20")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_assistant_mask_covers_answers_and_stop_token(tokenizer, name):
    apply_chat_template_choice(tokenizer, name)
    out = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    masked = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert masked == "85<|im_end|>20<|im_end|>"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_trl_accepts_the_template_for_assistant_only_loss(tokenizer, name):
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    apply_chat_template_choice(tokenizer, name)
    assert has_generation_markers(tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(tokenizer)


def test_model_choice_keeps_the_tokenizers_template(tokenizer):
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    apply_chat_template_choice(tokenizer, None)
    apply_chat_template_choice(tokenizer, "model")
    assert tokenizer.chat_template == "{{ messages[0]['content'] }}"


def test_model_choice_without_a_template_is_an_error(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat_template_choice(tokenizer, "model")


def test_unknown_name_lists_valid_choices(tokenizer):
    with pytest.raises(ValueError, match="alpaca.*chatml.*vicuna|chatml.*alpaca.*vicuna"):
        apply_chat_template_choice(tokenizer, "llama9")
