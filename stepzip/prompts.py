"""Prompt rendering for reasoning and for answering from (compressed) reasoning.

A model is a *thinking* model when its chat template mentions `<think>`; its reasoning
is then opened with `<think>\\n` and closed with `</think>`. Other models reason in plain
text and end with a final-answer line; to answer from compressed reasoning they are
given the reasoning and the cue `The answer is`.
"""

from __future__ import annotations

from dataclasses import dataclass

from stepzip.constants import ANSWER_CUE, THINK_CLOSE, THINK_OPEN

DEFAULT_TEMPLATE = (
    "Question: {problem}\nAnswer step by step, then write 'The answer is' and the number."
)
PLAIN_ANSWER_CUE = f"\n{ANSWER_CUE}"


@dataclass(frozen=True)
class PromptStyle:
    thinking: bool

    def reasoning_prompt(self, tokenizer, problem: str, template: str | None = None,
                         system: str | None = None) -> str:
        user = (template or DEFAULT_TEMPLATE).format(problem=problem)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}]
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=True)
        else:
            prompt = f"{user}\n\n"
        if self.thinking and not prompt.rstrip().endswith(THINK_OPEN):
            prompt += f"{THINK_OPEN}\n"
        return prompt

    def answer_prompt(self, reasoning_prompt: str, reasoning: str) -> str:
        """Prompt that makes the model answer from `reasoning` (full or compressed)."""
        if self.thinking:
            return f"{reasoning_prompt}{reasoning.rstrip()}\n{THINK_CLOSE}\n\n"
        return f"{reasoning_prompt}{reasoning.rstrip()}\n{PLAIN_ANSWER_CUE}"


def style_for(tokenizer) -> PromptStyle:
    template = getattr(tokenizer, "chat_template", None) or ""
    return PromptStyle(thinking=THINK_OPEN in template)
