"""Fault injection for reliability tests: ``DESMOE_FAULT`` names faults the recipe triggers on itself.

    DESMOE_FAULT="nan_loss@3,nan_loss@4"   the loss of steps 3 and 4 becomes NaN on every rank
    DESMOE_FAULT="kill_in_save@10"         rank 0 is SIGKILLed during the save of step 10, after
                                           every rank wrote its files and before the checkpoint is
                                           renamed complete

Unset (always, outside tests) nothing happens. The faults go through the real code paths:
a NaN loss through the real backward and DeepSpeed's overflow check; a kill through the
launcher's failure handling.
"""

from __future__ import annotations

import os
import signal


def _parse() -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for item in filter(None, os.environ.get("DESMOE_FAULT", "").split(",")):
        name, _, step = item.strip().partition("@")
        out.setdefault(name, set()).add(int(step))
    return out


def active(name: str, step: int) -> bool:
    return step in _parse().get(name, ())


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
