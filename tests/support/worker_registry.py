"""What the multi-rank worker modules share (see tests/support/dist_worker.py): the scenario
registry, the rank context, and two probes used by several scenarios."""
from __future__ import annotations

import contextlib

import torch.distributed as dist

SCENARIOS = {}

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor",
               "all_gather_object",
               "broadcast", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "barrier",
               "gather_object", "send", "recv", "reduce")


class Ctx:
    rank = 0
    world = 1


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


@contextlib.contextmanager
def collective_calls():
    """Record every torch.distributed collective called inside the block, as
    ``(name, size of the group it ran over)``."""
    calls = []
    saved = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name):
        def call(*a, **k):
            calls.append((name, dist.get_world_size(k.get("group"))))
            return saved[name](*a, **k)
        return call
    for name in COLLECTIVES:
        setattr(dist, name, counting(name))
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def error_of(fn, *kinds: type[BaseException]) -> str | None:
    """``str`` of the error ``fn()`` raises (one of ``kinds``), None if it returns."""
    try:
        fn()
    except kinds as e:
        return str(e)
    return None
