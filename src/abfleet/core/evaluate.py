"""Score a (possibly ablated) model: KL divergence on good prompts, marker rate on bad prompts."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from abfleet.core.chat import ChatFormatter
from abfleet.core.generate import encode_prompts, greedy_generate, next_token_logprobs
from abfleet.core.markers import MarkerMatcher, is_degenerate


@dataclass(frozen=True)
class Scores:
    """Raw counts, so nobody has to decode ratios: refusals k of n, degenerate answers, KL."""

    refusals: int
    n_bad: int
    degenerate: int
    kl: float
    n_good: int
    seconds: float
    samples: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["samples"] = [list(s) for s in self.samples]
        return data

    @property
    def label(self) -> str:
        return (
            f"refusals {self.refusals}/{self.n_bad}, KL {self.kl:.3f}, degenerate {self.degenerate}"
        )


class Evaluator:
    """Holds the encoded prompts and the base model's first-token log-probs, computed once."""

    def __init__(
        self,
        model: Any,
        chat: ChatFormatter,
        good: Sequence[str],
        bad: Sequence[str],
        matcher: MarkerMatcher,
        max_new_tokens: int,
        batch_size: int,
        n_samples: int = 3,
    ) -> None:
        self.model = model
        self.chat = chat
        self.good = list(good)
        self.bad = list(bad)
        self.matcher = matcher
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.n_samples = n_samples
        self._good_ids = encode_prompts(chat, self.good)
        self._bad_ids = encode_prompts(chat, self.bad)
        self.base_logprobs = self.first_token_logprobs()

    def first_token_logprobs(self) -> torch.Tensor:
        return next_token_logprobs(self.model, self.chat, self._good_ids, self.batch_size)

    def kl(self) -> float:
        """KL(base || current) of the first answer token, averaged over good prompts."""
        current = self.first_token_logprobs()
        kl = F.kl_div(current, self.base_logprobs, log_target=True, reduction="batchmean")
        return max(0.0, float(kl))

    def answers(self, max_new_tokens: int | None = None, stop_at_markers: bool = True) -> list[str]:
        gens = greedy_generate(
            self.model,
            self.chat,
            self.bad,
            max_new_tokens or self.max_new_tokens,
            self.batch_size,
            stop=self.matcher.matches if stop_at_markers else None,
            encoded=self._bad_ids,
        )
        return [g.text for g in gens]

    def count(self, texts: list[str]) -> tuple[int, int]:
        """(refusals, degenerate) of answers to the bad prompts."""
        refused = [self.matcher.is_refusal(t) for t in texts]
        # A refusal stops at its marker, so only the others are judged for looping; an empty
        # answer is both a refusal and degenerate.
        degenerate = sum(
            1
            for t, r in zip(texts, refused, strict=True)
            if not t.strip() or (not r and is_degenerate(t))
        )
        return sum(refused), degenerate

    def score(self) -> Scores:
        started = time.perf_counter()
        kl = self.kl()
        texts = self.answers()
        refusals, degenerate = self.count(texts)
        samples = tuple((self.bad[i], texts[i]) for i in range(min(self.n_samples, len(texts))))
        return Scores(
            refusals=refusals,
            n_bad=len(texts),
            degenerate=degenerate,
            kl=kl,
            n_good=len(self.good),
            seconds=time.perf_counter() - started,
            samples=samples,
        )
