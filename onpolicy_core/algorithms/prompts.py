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


# Hinted stream of Hinted Decoding (paper Sec. 4): the model sees the reference solution and is asked
# to re-derive it in its own words. Written for this project after the official demo's intent.
HINT_SYSTEM_PROMPT = """You get a math question and a correct reference solution.
Explain the solution as your own step-by-step reasoning, reaching the same final answer.
Do not mention the reference solution. Put the final answer within \\boxed{}."""

HINT_INPUT_TEMPLATE = """# Question
{question}

# Reference solution
{solution}
"""


def render_hinted_prompt(tokenizer: Any, question: str, solution: str, assistant_prefix: str = "") -> str:
    """The hinted stream's context: question + reference solution, then the assistant's prefix
    (the analysis and CoT marker) after which the realigned chain-of-thought is decoded."""
    msgs = [
        {"role": "system", "content": HINT_SYSTEM_PROMPT},
        {"role": "user", "content": HINT_INPUT_TEMPLATE.format(question=question, solution=solution)},
    ]
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        head = f"{HINT_SYSTEM_PROMPT}\n\n{msgs[1]['content']}\nAnswer:"
    return head + assistant_prefix
