"""Prompt templates: the reference (Alpaca/Dolly) template, the tokenizer's chat template, and raw text.

The reference template is the exact text of the official data processing (lmops-notes §6); the MiniLLM
evaluation sets ship prompts already formatted with it, which is why ``auto`` uses a record's ``prompt``
verbatim and formats only instruction records.
"""

from __future__ import annotations

from typing import Literal

from .records import DataError, Record

TemplateMode = Literal["auto", "reference", "chat", "raw"]
TEMPLATE_MODES = ("auto", "reference", "chat", "raw")

REFERENCE_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
REFERENCE_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)


def reference_prompt(instruction: str, input: str = "") -> str:
    """The reference template; the "with input" variant only when ``input`` is non-empty (as the reference)."""
    if input:
        return REFERENCE_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input)
    return REFERENCE_TEMPLATE.format(instruction=instruction)


def _user_text(record: Record) -> str:
    """The instruction (+ "\\n\\n" + input) as one user message; a prompt-only record's prompt."""
    if record.instruction is None:
        return record.prompt or ""
    return f"{record.instruction}\n\n{record.input}" if record.input else record.instruction


def chat_prompt(user_message: str, tokenizer) -> str:
    """The tokenizer's own chat template with one user turn and the assistant turn opened."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"data.template=chat, but the tokenizer `{getattr(tokenizer, 'name_or_path', '?')}` has no "
                        "chat template; use template=reference (or auto) for base models")
    return tokenizer.apply_chat_template([{"role": "user", "content": user_message}], add_generation_prompt=True,
                                         tokenize=False)


def render_prompt(record: Record, tokenizer, template: TemplateMode = "auto") -> str:
    """The prompt text of ``record`` under a ``DataConfig.template`` mode.

    - ``auto``: a record's ``prompt`` verbatim when it has one, else the reference template;
    - ``reference``: the reference template on instruction (+ input); a prompt-only record's prompt
      is taken as the instruction;
    - ``chat``: ``tokenizer.apply_chat_template`` on the instruction (+ "\\n\\n" + input) as the user message;
    - ``raw``: the ``prompt`` verbatim, else the instruction (+ "\\n\\n" + input) with no formatting.
    """
    if template == "auto":
        if record.prompt is not None:
            return record.prompt
        return reference_prompt(record.instruction or "", record.input)
    if template == "reference":
        if record.instruction is None:
            return reference_prompt(record.prompt or "")
        return reference_prompt(record.instruction, record.input)
    if template == "chat":
        return chat_prompt(_user_text(record), tokenizer)
    if template == "raw":
        return record.prompt if record.prompt is not None else _user_text(record)
    raise DataError(f"unknown data.template `{template}` (choose from {', '.join(TEMPLATE_MODES)})")
