"""Checkpoint format and resharding.

An optimizer's ``state_dict()`` is torch.optim's ``{"state", "param_groups"}``; the first
param group carries a ``"shardgrok"`` entry (format, global step, skipped steps, and SuperGrok's
cached signal, meta-net and meta-optimizer). It lives in ``param_groups`` rather than at the top
level because torch.distributed.checkpoint's ``get_optimizer_state_dict`` keeps only ``state``
and ``param_groups``. Per tensor, ``state`` holds ``step`` and m, v, mu (``exp_avg``,
``exp_avg_sq``, ``mu``).

Two shapes of the same format:

- full: m, v, mu have the parameter's shape. A single process saves this; it does not depend on
  the world size, and any optimizer (sharded or not, any world size) loads it.
- shard: one rank's ``state_dict()`` in a ZeRO-sharded job. m, v, mu are 1-D and hold only
  the rank's range of the flattened tensor; ``param_groups[0]["shardgrok"]["sharding"]``
  records the world size, rank, each tensor's range (``spans``) and shape. It loads only into
  the same rank of the same layout; :func:`consolidate_state_dict` merges all ranks' shards
  into a full one.

Under FSDP the state is DTensors (FSDP2) or flat shards (FSDP1), and
torch.distributed.checkpoint saves and reshards it. 8-bit state's per-block scales are not
shaped like the parameter, so FSDP2 hands them to it *by row* (:func:`scales_by_row`): a
``[rows, W]`` tensor sharded like the parameter's rows, each row holding the scales of the
blocks it touches (``"int8_scales": "rows"`` in the ``"shardgrok"`` entry).
:func:`values_by_row` reads that form back at any sharding.
"""
from __future__ import annotations

from typing import Any

import torch

from .reference import QBLOCK, QUANT_BIAS, SCALE_KEYS as _SCALE_KEYS, dequantize_codes

CHECKPOINT_KEY = "shardgrok"
CHECKPOINT_FORMAT = 1
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "mu")
#: 8-bit state's per-block scales of exp_avg, exp_avg_sq and mu
SCALE_KEYS = tuple(_SCALE_KEYS.values())


def row_width(row: int) -> int:
    """How many blocks a row of ``row`` elements touches at most (wherever it starts): the
    width of :func:`scales_by_row`'s form."""
    return row // QBLOCK if row % QBLOCK == 0 else (row + QBLOCK - 2) // QBLOCK + 1


def _row_blocks(first_row: int, rows: int, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows ``first_row ..`` of ``row`` elements: each row's touched blocks (global block
    index, ``[rows, W]``) and which of the W entries a row touches."""
    r = torch.arange(first_row, first_row + rows, dtype=torch.int64)[:, None]
    block = (r * row) // QBLOCK + torch.arange(row_width(row), dtype=torch.int64)
    return block, block <= (r * row + row - 1) // QBLOCK


def scales_by_row(scales: torch.Tensor, start: int, row: int, rows: int) -> torch.Tensor:
    """A piece's per-block ``scales`` (its ``rows`` rows of ``row`` elements from flat index
    ``start`` of its tensor) as one row of ``W`` per tensor row: entry j of row
    r is the scale of the j-th block row r touches, 0 past its last. A block two rows share
    is in both; where a rank boundary cuts it, each row holds the scale its own rank's codes
    were written at, so every row is read back alone (:func:`values_by_row`)."""
    n, first = scales.numel(), start // QBLOCK
    block, touched = _row_blocks(start // row, rows, row)
    local = (block - first).clamp(0, max(n - 1, 0))
    out = torch.zeros(block.shape, dtype=torch.float32, device=scales.device)
    if n:
        out = torch.where(touched.to(scales.device), scales.float()[local.to(scales.device)], out)
    return out


def values_by_row(codes: torch.Tensor, rows: torch.Tensor, start: int, row: int,
                  key: str) -> torch.Tensor:
    """fp32 values of the codes of whole tensor rows from flat index ``start`` (a multiple of
    ``row``), each element read at the scale its own row holds for its block
    (:func:`scales_by_row`'s form)."""
    flat = codes.reshape(-1)
    i = torch.arange(start, start + flat.numel(), dtype=torch.int64)
    r = i // row
    j = i // QBLOCK - (r * row) // QBLOCK
    scale = rows.float().reshape(-1, row_width(row))[(r - start // row), j]
    return dequantize_codes(flat, scale.to(flat.device), QUANT_BIAS[key]).view(codes.shape)


def extra_of(sd: dict[str, Any]) -> dict[str, Any] | None:
    """The ``"shardgrok"`` entry of a state dict (None if it has none)."""
    groups = sd.get("param_groups") if isinstance(sd, dict) else None
    if not groups or not isinstance(groups[0], dict):
        return None
    return groups[0].get(CHECKPOINT_KEY)


def checked_extra(sd: dict[str, Any], what: str = "state_dict") -> dict[str, Any]:
    """The ``"shardgrok"`` entry of ``sd``, refusing a state dict without one (for example
    torch.optim.AdamW's) or of another format; ``what`` names ``sd`` in the error."""
    extra = extra_of(sd)
    if extra is None:
        raise ValueError(f"{what} has no param_groups[0][{CHECKPOINT_KEY!r}] entry: it was not "
                         "saved by a shardgrok optimizer's state_dict()")
    if extra.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{what} has shardgrok checkpoint format {extra.get('format')!r}; this "
                         f"version reads format {CHECKPOINT_FORMAT}")
    return extra


def check_saved_by(extra: dict[str, Any], name: str, required: tuple[str, ...]) -> None:
    """Refuse the state of another optimizer before anything is loaded: the class named in the
    ``"shardgrok"`` entry (checkpoints before it was recorded name none), and the entries of
    that class's own state (``required``; SuperGrok's meta-net, for example)."""
    saved = extra.get("optimizer")
    if saved is not None and saved != name:
        raise ValueError(f"state_dict was saved by {saved}; this optimizer is {name}: load a "
                         f"{name} checkpoint (the two keep different state)")
    missing = [k for k in required if k not in extra]
    if missing:
        raise ValueError(f"state_dict has no {', '.join(map(repr, missing))} in its "
                         f"{CHECKPOINT_KEY!r} entry, which {name} keeps: it was saved by another "
                         "optimizer")


def check_groups(sd: dict[str, Any], sizes: list[int]) -> None:
    """The saved param groups must have this optimizer's sizes (torch's own check, with the
    sizes named)."""
    groups = sd.get("param_groups")
    if not isinstance(groups, list) or not isinstance(sd.get("state"), dict):
        raise ValueError("state_dict must be a dict with 'state' (a dict) and 'param_groups' (a "
                         "list), as optimizer.state_dict() returns")
    saved = [len(g.get("params", ())) for g in groups]
    if saved != sizes:
        raise ValueError(f"state_dict has param groups of {saved} tensors; this optimizer's "
                         f"have {sizes}: the checkpoint is for another model or another "
                         "grouping of its parameters")


def check_entries(sd: dict[str, Any]) -> None:
    """After the layout's import: one state entry per parameter its param groups list (the
    state is created eagerly, so every checkpoint has them all; the keys are indices, or the
    parameter names torch.distributed.checkpoint puts there), none for a parameter they do not
    list, each with step, m, v and mu (and 8-bit state's scales where it has codes)."""
    state = sd["state"]
    ids = [k for g in sd["param_groups"] for k in g["params"]]
    listed = set(ids)
    foreign = [k for k in state if k not in listed]
    if foreign:
        raise ValueError(f"state_dict['state'] has entries {sorted(map(str, foreign))[:5]} for "
                         f"parameters its param groups do not list (they list {len(ids)}): the "
                         "checkpoint is damaged or for another model")
    absent = [k for k in ids if k not in state]
    if absent:
        raise ValueError(f"state_dict['state'] has no entry for parameter(s) {absent[:8]} of "
                         f"{len(ids)}: the checkpoint is for another model, or was damaged")
    for k in ids:
        st = state[k]
        keys = STATE_KEYS + (SCALE_KEYS if any(key in st for key in SCALE_KEYS) else ())
        missing = [key for key in keys if key not in st]
        if missing:
            raise ValueError(f"state_dict['state'][{k!r}] lacks {missing}: every tensor's state "
                             f"holds {list(keys)}")


def without_extra(sd: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``sd`` without the ``"shardgrok"`` entry (what torch.optim loads)."""
    groups = [dict(g) for g in sd["param_groups"]]
    groups[0].pop(CHECKPOINT_KEY, None)
    return {**sd, "param_groups": groups}


def check_full_state(sd: dict[str, Any], params: list[torch.Tensor]) -> None:
    """A full state dict must hold whole tensors for these parameters: m, v and mu (or their
    8-bit codes) of the parameter's shape, and for 8-bit state one scale per block of each."""
    for i, p in enumerate(params):
        for key, v in sd.get("state", {}).get(i, {}).items():
            if key in STATE_KEYS[1:] and tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"state_dict['state'][{i}][{key!r}] has shape {tuple(v.shape)} "
                                 f"but parameter {i} has shape {tuple(p.shape)}: the checkpoint "
                                 "is for another model")
            want = -(-p.numel() // QBLOCK) if key in SCALE_KEYS else None
            if want is not None and v.numel() != want:
                raise ValueError(f"state_dict['state'][{i}][{key!r}] has {v.numel()} scales "
                                 f"but parameter {i} (shape {tuple(p.shape)}) has {want} blocks: "
                                 "the checkpoint is for another model")


def consolidate_state_dict(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge every rank's sharded ``state_dict()`` (any order) into one full state dict, the
    world-size-independent form that loads at any world size. Runs anywhere, no process group
    needed (e.g. offline over the files each rank saved)."""
    if not shards:
        raise ValueError("consolidate_state_dict needs at least one shard")
    metas = [checked_extra(sd, f"shards[{j}]").get("sharding") for j, sd in enumerate(shards)]
    if metas[0] is None:
        if len(shards) == 1:
            return shards[0]
        raise ValueError("shards[0] is a full state dict, not a shard; pass only shards")
    world = metas[0]["world_size"]
    ranks = sorted(m["rank"] if m else -1 for m in metas)
    if ranks != list(range(world)) or any(m["world_size"] != world or m["shapes"] != metas[0]["shapes"]
                                          for m in metas):
        raise ValueError(f"consolidate_state_dict needs exactly one shard from each of the "
                         f"{world} ranks of one checkpoint; got ranks {ranks}")
    order = sorted(range(len(shards)), key=lambda j: metas[j]["rank"])
    first = shards[order[0]]
    shapes = metas[0]["shapes"]
    state: dict[int, dict[str, Any]] = {}
    for i, shape in enumerate(shapes):
        entry = dict(first["state"][i])
        numel = 1
        for d in shape:
            numel *= d
        for key in STATE_KEYS[1:]:
            ref = first["state"][i][key]
            full = torch.zeros(numel, dtype=ref.dtype, device=ref.device)
            covered = 0
            for j in order:
                a, e = metas[j]["spans"][i]
                full[a:e] = shards[j]["state"][i][key].reshape(-1)
                covered += e - a
            if covered != numel:
                raise ValueError(f"the shards cover {covered} of tensor {i}'s {numel} elements")
            entry[key] = full.view(shape)
        for key in SCALE_KEYS if SCALE_KEYS[0] in first["state"][i] else ():
            # 8-bit state: each shard holds the scales of its (whole) blocks
            full = torch.zeros(-(-numel // QBLOCK), dtype=torch.float32)
            for j in order:
                a, e = metas[j]["spans"][i]
                if a < e:
                    full[a // QBLOCK:a // QBLOCK + shards[j]["state"][i][key].numel()] = \
                        shards[j]["state"][i][key].float().cpu()
            entry[key] = full
        state[i] = entry
    groups = [dict(g) for g in first["param_groups"]]
    groups[0][CHECKPOINT_KEY] = {k: v for k, v in extra_of(first).items() if k != "sharding"}
    return {"state": state, "param_groups": groups}
