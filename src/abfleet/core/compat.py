"""The transformers internals the core relies on, reached in the form the installed version has.

The core goes below the public `generate()` API in three places: it hands its own KV cache to
the model (and sees it arrive at each decoder layer, to skip the layers a trial leaves
unedited), it watches the cache's `update(key, value, layer_idx, ...)` to keep those layers'
entries, and it joins caches made of plain growing layers. transformers 5.x renamed the cache's
keyword from `past_key_values` to `cache` (the old name stays a deprecated alias for a while,
but a decoder layer then receives only the new one), so the names are read from the installed
classes' signatures, never assumed. An optimization whose hook cannot be found is switched off
with a reason (`unsupported`), and the run says so in one line instead of silently running
slower.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# Newest first: the name a version's forward() declares for the KV cache.
CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value")


def transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def _parameters(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)  # follows functools.wraps' __wrapped__
    except (TypeError, ValueError):
        return {}


@functools.cache
def _cache_keyword_of(cls: type) -> str | None:
    params = _parameters(cls.forward)
    return next((name for name in CACHE_KEYWORDS if name in params), None)


def cache_keyword(module: Any) -> str | None:
    """The keyword under which this module's forward() takes the KV cache, or None."""
    return _cache_keyword_of(type(module))


def model_cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand `cache` to a causal LM's forward()."""
    return {cache_keyword(model) or "past_key_values": cache}


def layer_cache(kwargs: dict[str, Any], keyword: str) -> Any:
    """The KV cache a decoder layer was called with (None without one)."""
    return kwargs.get(keyword)


@functools.cache
def _cache_update_ok() -> bool:
    from transformers import DynamicCache

    names = [n for n in _parameters(DynamicCache.update) if n != "self"]
    return names[:3] == ["key_states", "value_states", "layer_idx"]


def layer_reuse_unsupported(layers: list[Any]) -> str | None:
    """Why the unedited layers' reuse cannot engage with this model and transformers version
    (None: it can). The reuse needs the cache handed to every decoder layer by keyword, and the
    cache's update(key, value, layer_idx) to watch."""
    if not layers:
        return "the model has no decoder layers to skip"
    kinds = {type(layer) for layer in layers}
    missing = sorted(k.__name__ for k in kinds if _cache_keyword_of(k) is None)
    if missing:
        return (
            f"transformers {transformers_version()}'s {missing[0]} takes its KV cache under none "
            f"of {', '.join(CACHE_KEYWORDS)}"
        )
    if not _cache_update_ok():
        return (
            f"transformers {transformers_version()}'s DynamicCache.update is not "
            "update(key_states, value_states, layer_idx, ...)"
        )
    return None
