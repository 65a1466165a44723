"""Conversation templates as Jinja chat templates: one text serves training and inference.

Training renders a conversation with the template and labels the characters inside its
``{% generation %}`` blocks (the assistant answers and their end-of-turn token); the same text is
saved as the checkpoint's ``chat_template``, so ``processor.apply_chat_template`` at serving time
builds exactly the prompts the model was trained on.

Message ``content`` may be a string (LLaVA datasets: ``"<image>\\nWhat is ...?"``) or a list of
``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts (the OpenAI / transformers style);
image parts render first, each as ``<image>\\n``, then the text parts.
"""

from __future__ import annotations

import re

IMAGE_PLACEHOLDER = "<image>"
"""The placeholder in LLaVA-format text and the image token added to the tokenizer."""
VIDEO_TOKEN = "<video>"
"""OneVision's video token (added to the tokenizer). LLaVA-format video records mark the video with
``<image>`` (as LLaVA-Video's data does); the row builder expands that placeholder into video tokens."""

_CONTENT = (  # image (then video) parts first, as LLaVA's data puts "<image>\\n" first, whatever order a client sends
    "{%- macro content(message) -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'video' -%}{{ '<video>\\n' }}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

QWEN_SYSTEM = "You are a helpful assistant."
"""LLaVA-NeXT's ``conv_qwen`` system message (its ``qwen_1_5`` version)."""
CHATML_DIRECT_SYSTEM = "Answer the questions."
"""LLaVA-NeXT's ``conv_chatml_direct`` system message (the NeXT-34B recipe)."""


def _chatml(default_system: str | None) -> str:
    """ChatML turns (``<|im_start|>role\n...<|im_end|>\n``); with ``default_system``, a system turn
    with that text opens every conversation that does not bring its own."""
    opening = ("" if default_system is None else
               "{%- if messages[0]['role'] != 'system' -%}"
               "{{ '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}{%- endif -%}")
    return _CONTENT + opening + (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- generation -%}{{ content(message) }}{{ '<|im_end|>' }}{%- endgeneration -%}"
        "{%- else -%}{{ content(message) }}{{ '<|im_end|>' }}{%- endif -%}"
        "{{ '\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


CHAT_TEMPLATES: dict[str, str] = {
    # Stage-1 captioning (LLaVA's `plain`): the image tokens, then the caption and a newline. Like
    # LLaVA, it takes exactly one question (whose text it drops) and one caption.
    "plain": _CONTENT + (
        "{%- if messages | length != 2 or messages[0]['role'] != 'user' -%}"
        "{{ raise_exception('the plain template takes one user turn and one caption') }}{%- endif -%}"
        "{{ bos_token }}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- set text = content(message) -%}"
        "{%- if '<image>' not in text -%}{{ raise_exception('the plain template needs an image') }}{%- endif -%}"
        "{{ '<image>' * text.count('<image>') }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{%- generation -%}{{ content(message) }}{{ '\\n' }}{%- endgeneration -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    # Vicuna v1 (LLaVA-1.5): "<sys> USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>". The space after
    # "ASSISTANT:" is part of the answer, so the serving prompt (ending in "ASSISTANT:") is exactly the
    # trained prefix.
    "vicuna_v1": _CONTENT + (
        "{{ bos_token }}"
        "{%- if messages[0]['role'] == 'system' -%}{{ content(messages[0]) }}"
        "{%- else -%}{{ \"" + VICUNA_SYSTEM + "\" }}{%- endif -%}{{ ' ' }}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{ 'USER: ' }}{{ content(message) }}{{ ' ' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT:' }}"
        "{%- generation -%}{{ ' ' + content(message) }}{{ eos_token }}{%- endgeneration -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    ),
    # Llama 3 instruct headers.
    "llama3": _CONTENT + (
        "{{ bos_token }}"
        "{%- for message in messages -%}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- generation -%}{{ content(message) }}{{ '<|eot_id|>' }}{%- endgeneration -%}"
        "{%- else -%}{{ content(message) }}{{ '<|eot_id|>' }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    ),
    # Mistral instruct: "[INST] q [/INST]a</s>[INST] ..." (a system message is prefixed to the first turn).
    "mistral": _CONTENT + (
        "{{ bos_token }}"
        "{%- set ns = namespace(system='') -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{%- set ns.system = content(message) + '\\n\\n' -%}"
        "{%- elif message['role'] == 'user' -%}{{ '[INST] ' + ns.system }}{{ content(message) }}{{ ' [/INST]' }}"
        "{%- set ns.system = '' -%}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{%- generation -%}{{ content(message) }}{{ eos_token }}{%- endgeneration -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    # ChatML as written by the message list (no system turn unless the conversation has one).
    "chatml": _chatml(None),
    # LLaVA-NeXT's `qwen_1_5` (Qwen1.5-Chat LMs: NeXT-72B/110B): ChatML with Qwen's default system turn.
    "qwen_1_5": _chatml(QWEN_SYSTEM),
    # LLaVA-NeXT's `chatml_direct` (Nous-Hermes-2-Yi-34B: NeXT-34B): ChatML with a terse default system turn.
    "chatml_direct": _chatml(CHATML_DIRECT_SYSTEM),
}


class TemplateError(ValueError):
    """A template that cannot label assistant turns."""


GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")

END_OF_TURN = {"plain": None, "vicuna_v1": "eos", "mistral": "eos", "llama3": "<|eot_id|>", "chatml": "<|im_end|>",
               "qwen_1_5": "<|im_end|>", "chatml_direct": "<|im_end|>"}
"""The token that ends an answer in each template (``eos``: the tokenizer's own EOS token)."""


def end_of_turn_token(name: str, tokenizer) -> str | None:
    """The token generation must stop at for a template (``tokenizer``: the EOS token)."""
    token = END_OF_TURN.get(name, "eos")
    return tokenizer.eos_token if token == "eos" else token


def resolve_chat_template(name: str, tokenizer_chat_template: str | None) -> str:
    """The Jinja text for a recipe's ``data.template``.

    ``tokenizer`` uses the language model's own chat template, which must mark assistant turns
    with ``{% generation %}`` blocks so that labels can be derived from it.
    """
    if name in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name]
    if name != "tokenizer":
        raise TemplateError(f"unknown template {name!r}; allowed: {', '.join([*CHAT_TEMPLATES, 'tokenizer'])}")
    if not tokenizer_chat_template:
        raise TemplateError("template 'tokenizer': the tokenizer has no chat_template; pick one of ours")
    if not GENERATION_BLOCK.search(tokenizer_chat_template):
        raise TemplateError(
            "template 'tokenizer': the tokenizer's chat template has no {% generation %} blocks, so assistant "
            f"turns cannot be labelled; use one of: {', '.join(CHAT_TEMPLATES)}"
        )
    return tokenizer_chat_template
