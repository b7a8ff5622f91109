"""Named Jinja chat templates for HF tokenizers, with TRL's generation markers.

Usage::

    from stages.chat_templates import TEMPLATES, apply_chat_template_choice

    apply_chat_template_choice(tokenizer, "chatml")   # set a named template
    apply_chat_template_choice(tokenizer, None)       # keep the tokenizer's own (error if none)

Every template wraps the assistant's content *and its end-of-turn token* in
``{% generation %}...{% endgeneration %}``, so ``return_assistant_tokens_mask=True`` (and TRL's
``assistant_only_loss=True``) marks exactly what the model must learn to emit, including the stop
token. Each template supports ``add_generation_prompt``, system messages and multi-turn
conversations, and the generation prompt is an exact prefix of the rendered assistant turn (DPO and
GRPO split prompt from completion on that boundary).

Rendered formats (``{eos}`` is the tokenizer's ``eos_token``):

``chatml``::

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{user}<|im_end|>\\n
    <|im_start|>assistant\\n{assistant}<|im_end|>\\n
    generation prompt: <|im_start|>assistant\\n

``alpaca``::

    {system}\\n\\n
    ### Instruction:\\n{user}\\n\\n
    ### Response:\\n{assistant}{eos}\\n\\n
    generation prompt: ### Response:\\n

``vicuna``::

    {system}\\n\\n
    USER: {user}\\n
    ASSISTANT: {assistant}{eos}\\n
    generation prompt: ASSISTANT:  (with one trailing space)
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# Templates are written on one line with newlines only inside Jinja string literals, so Jinja's
# whitespace handling can never add or eat a newline by accident.
_CHATML = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# `eos_token` comes from the tokenizer's special tokens (transformers passes them to the template);
# it closes the assistant turn inside the generation block so the model learns to stop.
_EOS = "(eos_token if eos_token is defined and eos_token else '')"

_ALPACA = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '### Response:\\n' }}"
    "{% generation %}{{ message['content'] + " + _EOS + " }}{% endgeneration %}"
    "{{ '\\n\\n' }}"
    "{%- else -%}"
    "{{ raise_exception('alpaca template: unsupported role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Response:\\n' }}{%- endif -%}"
)

_VICUNA = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ 'USER: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT: ' }}"
    "{% generation %}{{ message['content'] + " + _EOS + " }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ raise_exception('vicuna template: unsupported role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT: ' }}{%- endif -%}"
)

TEMPLATES: dict[str, str] = {"chatml": _CHATML, "alpaca": _ALPACA, "vicuna": _VICUNA}

# Choices that mean "keep the template the tokenizer ships with".
MODEL_CHOICES = (None, "model")

CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")


def valid_choices() -> list[str]:
    """The names ``apply_chat_template_choice`` accepts: ``model`` plus every key of ``TEMPLATES``."""
    return ["model", *TEMPLATES]


def apply_chat_template_choice(tokenizer, choice: str | None) -> None:
    """Set ``tokenizer.chat_template`` from a config choice, in place.

    ``None`` or ``"model"`` keeps the tokenizer's own template (ValueError if it has none); a name from
    ``TEMPLATES`` replaces it; anything else raises ValueError listing the valid names.
    ``alpaca`` and ``vicuna`` end each assistant turn with ``tokenizer.eos_token``, so they need one.
    """
    if choice in MODEL_CHOICES:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "chat_template 'model' was chosen but the tokenizer has no chat template; "
                f"choose one of {list(TEMPLATES)}"
            )
        return
    if choice not in TEMPLATES:
        raise ValueError(f"unknown chat template {choice!r}; valid choices: {valid_choices()}")
    if choice in ("alpaca", "vicuna") and not getattr(tokenizer, "eos_token", None):
        raise ValueError(f"chat template {choice!r} needs tokenizer.eos_token to end assistant turns")
    if choice == "chatml":
        _warn_if_markers_split(tokenizer)
    tokenizer.chat_template = TEMPLATES[choice]


def _warn_if_markers_split(tokenizer) -> None:
    # Without the markers as single tokens the template still renders and masks correctly, but the
    # model cannot stop on `<|im_end|>` unless it is the eos; adding tokens would need an embedding
    # resize, which is the caller's business, so only warn.
    vocab = tokenizer.get_vocab()
    missing = [m for m in CHATML_MARKERS if m not in vocab]
    if missing:
        logger.warning(
            "chatml template: %s are not single tokens in this tokenizer; generation will not stop "
            "at <|im_end|> unless it is added as a special token (and set as eos)",
            missing,
        )


def conversation_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation rendered with the tokenizer's chat template (tokenized by it too, so
    special tokens in the template are not added twice)."""
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            add_generation_prompt=add_generation_prompt)
    return list(encoded["input_ids"])
