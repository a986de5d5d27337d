"""Which instance a command means: an explicit id, or the only one; never a guess."""

from __future__ import annotations

import time
from collections.abc import Callable

from abfleet.errors import UserError
from abfleet.fleet.ledger import InstanceRecord, Ledger


def resolve_instance(
    ledger: Ledger,
    given: str | None,
    choose: Callable[[list[InstanceRecord]], InstanceRecord] | None,
) -> InstanceRecord:
    """An explicit id, or the only instance; with several, ask (or fail without a terminal).

    Never "the first one": commands that guessed acted on a stopped or wrong instance.
    """
    active = [r for r in ledger.instances() if r.instance_id]
    if given:
        matches = [r for r in active if r.instance_id == given]
        if not matches:
            gone = [r for r in ledger.find(given)]
            if gone:
                raise UserError(
                    f"instance {given} was {gone[-1].state} on {time.strftime('%Y-%m-%d %H:%M', time.localtime(gone[-1].destroyed_at or gone[-1].created_at))}"
                )
            raise UserError(
                f"unknown instance {given}: it is not one abfleet created (see `abfleet list`)"
            )
        if len(matches) > 1:
            raise UserError(
                f"instance id {given} is ambiguous across providers: {', '.join(r.provider for r in matches)}"
            )
        return matches[0]
    if not active:
        raise UserError("no instances: create one with `abfleet launch` or `abfleet create`")
    if len(active) == 1:
        return active[0]
    ids = ", ".join(f"{r.instance_id} ({r.label})" for r in active)
    if choose is None:
        raise UserError(f"several instances ({ids}): name the one you mean")
    return choose(active)
