"""Prompts rendered with the model's own chat template and a configurable system prompt."""

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
        if self.system_prompt:
            try:
                self._render([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
            except Exception:  # noqa: BLE001 - jinja templates raise anything on a system turn
                # Some templates (Gemma 2, Mistral v1) reject a system turn: fold it into the user.
                log.info("chat template rejects a system turn; prepending the system prompt")
                self._system_in_user = True

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
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
        return self._render(self.messages(prompt))

    def turn_end_text(self) -> str:
        """What the template writes after an assistant answer (e.g. ``<|im_end|>``)."""
        msgs = [*self.messages("q"), {"role": "assistant", "content": _PROBE}]
        rendered = self._render(msgs, generation_prompt=False)
        tail = rendered.split(_PROBE, 1)[1] if _PROBE in rendered else ""
        return tail.strip() or (self.tokenizer.eos_token or "")
