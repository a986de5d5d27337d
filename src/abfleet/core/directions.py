"""Per-layer behaviour directions from the residual stream at the last prompt token."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from abfleet.core.chat import ChatFormatter
from abfleet.core.generate import (
    encode_prompts,
    forward,
    make_batches,
    model_device,
    pad_token_id,
)


@torch.inference_mode()
def mean_residuals(
    model: Any, chat: ChatFormatter, prompts: Sequence[str], batch_size: int
) -> torch.Tensor:
    """Mean hidden state of the last prompt token at every layer output: (n_layers + 1, d_model).

    Row 0 is the embedding output. Residuals are upcast to float32 and summed in float64, so
    the mean does not depend on the model's dtype beyond the residuals themselves.
    """
    encoded = encode_prompts(chat, prompts)
    device = model_device(model)
    total: torch.Tensor | None = None
    for batch in make_batches(encoded, batch_size, pad_token_id(chat.tokenizer), device):
        out = forward(model, batch, hidden_states=True)
        # Left padding puts every prompt's last token in the last column.
        last = torch.stack([h[:, -1, :].float().cpu() for h in out.hidden_states], dim=1)
        part = last.to(torch.float64).sum(dim=0)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no prompts to compute residuals from")
    return total / len(encoded)


def compute_directions(
    mean_bad: torch.Tensor, mean_good: torch.Tensor, projected: bool = True
) -> torch.Tensor:
    """Unit direction per layer: normalize(mean_bad - mean_good).

    The projected variant removes the component along the mean good residual, so ablating the
    direction takes away the behaviour without also shrinking what good prompts rely on.
    """
    r = _unit(mean_bad - mean_good)
    if projected:
        g = _unit(mean_good)
        r = _unit(r - (r * g).sum(dim=-1, keepdim=True) * g)
    return r.to(torch.float32)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
