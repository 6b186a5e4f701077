"""The scenario registry shared by the multi-rank worker modules (see tests/dist_worker.py)."""
SCENARIOS = {}


class Ctx:
    rank = 0
    world = 1


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn
