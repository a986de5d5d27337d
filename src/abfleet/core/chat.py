"""Prompts rendered with the model's own chat template and a configurable system prompt.

Reasoning models: where the template has a switch for thinking (``enable_thinking``, as Qwen3's
does) it is turned off, so the model answers at once and the first answer token is the one
scored. A model that thinks anyway gets an answer prefix (core.reasoning), appended after the
generation prompt, so scores are taken after its think block.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

_PROBE = "\u2063abfleet-probe\u2063"


class ChatFormatter:
    """Turns a user prompt into the exact text the model sees before it answers."""

    def __init__(self, tokenizer: Any, system_prompt: str | None) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt or None
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat template: abliteration needs an instruct model"
            )
        self._system_in_user = False
        self.answer_prefix = ""
        # Thinking off where the template can do it: every answer would start with the same
        # think block, which makes the first-token KL near zero and hides the answer itself.
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
        self.template_kwargs: dict[str, Any] = (
            {"enable_thinking": False} if "enable_thinking" in template else {}
        )
        if self.system_prompt:
            try:
                self._render([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
            except Exception:  # noqa: BLE001 - jinja templates raise anything on a system turn
                # Some templates (Gemma 2, Mistral v1) reject a system turn: fold it into the user.
                log.info("chat template rejects a system turn; prepending the system prompt")
                self._system_in_user = True

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            **self.template_kwargs,
        )

    def messages(self, prompt: str) -> list[dict[str, str]]:
        if not self.system_prompt:
            return [{"role": "user", "content": prompt}]
        if self._system_in_user:
            return [{"role": "user", "content": f"{self.system_prompt}\n\n{prompt}"}]
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": prompt},
        ]

    def format(self, prompt: str) -> str:
        return self._render(self.messages(prompt)) + self.answer_prefix

    def turn_end_text(self) -> str:
        """What the template writes after an assistant answer (e.g. ``<|im_end|>``)."""
        msgs = [*self.messages("q"), {"role": "assistant", "content": _PROBE}]
        rendered = self._render(msgs, generation_prompt=False)
        tail = rendered.split(_PROBE, 1)[1] if _PROBE in rendered else ""
        return tail.strip() or (self.tokenizer.eos_token or "")
