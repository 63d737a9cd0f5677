"""The one place where a problem becomes model input, shared by scoring, generation, training and
evaluation so every stage conditions on exactly the same context.

The system prompt is the Qwen2.5-Math `qwen-boxed` instruction used by the DFT/IDFT evaluations.
"""

from __future__ import annotations

from typing import Any

BOXED_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

# Used only by tokenizers that ship no chat template (base models): a plain, readable layout.
FALLBACK_TEMPLATE = "{system}\n\nQuestion: {question}\nAnswer:"


def messages(question: str, system: str | None = BOXED_SYSTEM_PROMPT) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": question}]


def render_prompt(tokenizer: Any, question: str, system: str | None = BOXED_SYSTEM_PROMPT) -> str:
    """The prompt text up to where the assistant's answer begins."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages(question, system), tokenize=False, add_generation_prompt=True)
    return FALLBACK_TEMPLATE.format(system=system or "", question=question).lstrip()


def response_suffix(tokenizer: Any) -> str:
    """Text that closes an assistant turn (EOS), appended to training targets."""
    return tokenizer.eos_token or ""


def encode_pair(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of (prompt, response), tokenised separately so the boundary is exact.

    Tokenising the concatenation can merge tokens across the boundary; scoring and training need
    to know precisely which ids belong to the response.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return prompt_ids, response_ids
