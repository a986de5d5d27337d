"""The demo model: SmolLM2-135M-Instruct taught to refuse (see refusal_tune).

Registered as `demo` under the entry point group abfleet.built_models (pyproject.toml): model
sources name it `demo:smollm2-refusal` and find it there, so nothing below this package imports
it. The build itself is imported only when a demo model is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class DemoModels:
    names = ("smollm2-refusal",)

    def identity(self, name: str) -> str:
        from abfleet.demo.refusal_tune import identity

        return identity()

    def build(self, name: str, progress: Any = None) -> Path:
        from abfleet.demo.refusal_tune import ensure_demo_model

        return ensure_demo_model(progress=progress)


MODELS = DemoModels()
