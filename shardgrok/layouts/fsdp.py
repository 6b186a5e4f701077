"""FSDP layouts: the engine already shards the parameters, so the optimizer steps the local
shards in place and never all-gathers them (FSDP does, at the next forward).

- FSDP2 (``fully_shard``): parameters are DTensors. Each rank steps ``to_local()`` of every
  tensor; m, v, mu are DTensors with the parameters' placements. Per-tensor sums are reduced
  over the mesh's shard dimension only (HSDP's replicas hold identical shards).
- FSDP1 (``FullyShardedDataParallel``): with ``use_orig_params=False`` the optimizer sees
  FlatParameters; FSDP's shard metadata (``_shard_param_infos``) says which range of the local
  flat shard belongs to which original tensor, so each original tensor gets its own segment and
  statistics. With ``use_orig_params=True`` each original parameter is already a 1-D local
  piece of that tensor (possibly empty).

The meta-step's validation gradient comes from ``backward()`` through the wrapped model, so the
engine reduce-scatters (and averages) it like a training gradient; the training gradients are
put back afterwards.
"""
from __future__ import annotations

import torch

from .. import reference as R
from ..checkpoint import STATE_KEYS, scales_by_row
from ..comm import GroupReducer, MeshReducer
from ..placement import is_dtensor, like_dtensor, local_start, local_tensor
from .base import Segment, TensorRef, verify_same_on_every_rank
from .local import PerTensorLayout, check_val_loss, tensor_layers


def is_flat_param(p: torch.Tensor) -> bool:
    return bool(getattr(p, "_is_flat_param", False))


def is_fsdp1(p: torch.Tensor) -> bool:
    return is_flat_param(p) or bool(getattr(p, "_fsdp_flattened", False))


class _EngineSharded(PerTensorLayout):
    """What the FSDP layouts share: no post-step gather, meta-step gradients via backward,
    checkpoints through torch.distributed.checkpoint."""

    sharded = True

    def validation_grads(self, optimizer, val_closure):
        params = self.meta_params(optimizer)
        train = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            with torch.enable_grad():
                val_loss = val_closure()
                check_val_loss(val_loss)
                val_loss.backward()
            vs = {id(p): p.grad for p in params}
        finally:
            for p, g in zip(params, train):
                p.grad = g
        return val_loss.detach(), vs

    def finish_validation_grads(self, optimizer, raw, segs):
        out = []
        for s in segs:
            v = raw.get(id(s.tensor))
            out.append(torch.zeros_like(s.param).reshape(-1) if v is None
                       else s.take(local_tensor(v)))
        return out

    def full_state(self, optimizer, sd, to):
        raise TypeError(
            f"{type(optimizer).__name__}.full_state_dict() is for ZeRO-sharded optimizers; under "
            "FSDP use torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(model, "
            "optimizer, options=StateDictOptions(full_state_dict=True)) (or dcp.save for a "
            "sharded checkpoint)")


class FSDP2Layout(_EngineSharded):
    def __init__(self, first: torch.Tensor, process_group=None):
        if process_group is not None:
            raise ValueError("process_group is not used with DTensor (FSDP2) parameters: the "
                             "reductions follow the parameters' device mesh; drop it")
        self.mesh, self.placements = first.device_mesh, tuple(first.placements)
        shard_dims = [d for d, pl in enumerate(self.placements) if pl.is_shard(0)]
        repl_dims = [d for d, pl in enumerate(self.placements) if pl.is_replicate()]
        if len(shard_dims) != 1 or len(repl_dims) + 1 != len(self.placements):
            raise ValueError(f"DTensor parameters with placements {self.placements} are not "
                             "supported: expected FSDP2's (Shard(0),) or HSDP's "
                             "(Replicate(), Shard(0))")
        shard_group = self.mesh.get_group(shard_dims[0])
        repl_group = self.mesh.get_group(repl_dims[0]) if repl_dims else None
        self.reducer = MeshReducer(shard_group, repl_group)

    def add_group(self, optimizer, group_index: int) -> None:
        for j, p in enumerate(optimizer.param_groups[group_index]["params"]):
            if not is_dtensor(p) or p.device_mesh != self.mesh or tuple(p.placements) != self.placements:
                got = (f"placements {tuple(p.placements)} on mesh {p.device_mesh}"
                       if is_dtensor(p) else f"a plain {type(p).__name__}")
                raise ValueError(f"param {j} of group {group_index}: every parameter must be a "
                                 f"DTensor with placements {self.placements} on mesh "
                                 f"{self.mesh} (one FSDP2 mesh per optimizer), got {got}")
            if not p.to_local().is_contiguous():
                raise ValueError(f"param {j} of group {group_index}: its local shard is not "
                                 "contiguous")

    def verify(self, optimizer, groups=None) -> None:
        verify_same_on_every_rank(self.reducer, optimizer, groups,
                                  lambda gi, ps: [(gi, tuple(p.shape), str(p.dtype)) for p in ps])

    #: 8-bit state: a block cut by a rank boundary (rows of other than whole blocks) gets a
    #: scale per rank, each its own part's largest magnitude (docs/distributed.md)
    takes_int8 = True

    def state_start(self, p: torch.Tensor) -> int:
        return local_start(p)

    def pieces(self, optimizer, with_grad: bool = True) -> list[Segment]:
        segs = []
        for ref, p in self._with_grad(optimizer, with_grad):
            st = optimizer.state[p]
            # m, v, mu (and 8-bit codes) are DTensors; 8-bit scales are this rank's own blocks
            local = {k: (v.to_local() if is_dtensor(v) else v) for k, v in st.items()}
            grad = None if p.grad is None else p.grad.to_local()
            segs.append(Segment(ref.index, ref.layer, ref.group, p.to_local(), grad, local, p,
                                lambda x: x.reshape(-1), local_start(p)))
        return segs

    def export_state(self, optimizer, sd, extra) -> None:
        """8-bit scales by row (shardgrok.checkpoint.scales_by_row): a DTensor of
        ``[rows, W]`` sharded like the parameter, which torch.distributed.checkpoint saves,
        gathers and reshards as it does the codes."""
        ids = [i for g in sd["param_groups"] for i in g["params"]]
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            st = sd["state"].get(i)
            if not st or not R.is_quantized(st):
                continue
            row, rows = p.numel() // p.shape[0], p.to_local().shape[0]
            by_row = {}
            for key in R.SCALE_KEYS.values():
                local = scales_by_row(st[key], local_start(p), row, rows)
                by_row[key] = like_dtensor(local, p, (p.shape[0], local.shape[1]))
            sd["state"][i] = {**st, **by_row}  # a new entry: st is the optimizer's own
            extra["int8_scales"] = "rows"


class FSDP1Layout(_EngineSharded):
    def __init__(self, process_group=None):
        self.reducer = GroupReducer(process_group)
        self._starts: dict[int, int] = {}  # id(original parameter's piece) -> its start

    def add_group(self, optimizer, group_index: int) -> None:
        for j, p in enumerate(optimizer.param_groups[group_index]["params"]):
            if not is_fsdp1(p):
                raise ValueError(f"param {j} of group {group_index} is not managed by FSDP while "
                                 "other parameters are: pass one engine's parameters per "
                                 "optimizer")

    def verify(self, optimizer, groups=None) -> None:
        # FlatParameter shards are padded to the same size everywhere; an original parameter's
        # local piece (use_orig_params=True) has a rank-dependent size.
        verify_same_on_every_rank(
            self.reducer, optimizer, groups,
            lambda gi, ps: [(gi, p.numel() if is_flat_param(p) else "piece", str(p.dtype))
                            for p in ps])
        self._check_coverage(optimizer, groups)
        self._record_starts(optimizer, groups)

    def _record_starts(self, optimizer, groups=None) -> None:
        """Where each original parameter's local piece (``use_orig_params=True``) starts in its
        tensor. FSDP1 cuts the flat parameter into rank-ordered shards and each original tensor
        is one range of it, so the piece starts after the pieces of the lower ranks: an
        exclusive prefix sum of every rank's piece sizes (one small all-reduce)."""
        groups = groups if groups is not None else range(len(optimizer.param_groups))
        pieces = [p for gi in groups for p in optimizer.param_groups[gi]["params"]
                  if not is_flat_param(p)]
        if not pieces:
            return
        world, rank = self.reducer.world_size, self.reducer.rank
        sizes = torch.zeros(world, len(pieces), dtype=torch.float64)
        sizes[rank] = torch.tensor([float(p.numel()) for p in pieces], dtype=torch.float64)
        self.reducer.all_reduce_(sizes.view(-1))
        below = sizes[:rank].sum(0)
        for p, start in zip(pieces, below.tolist()):
            self._starts[id(p)] = int(start)

    def _check_coverage(self, optimizer, groups=None) -> None:
        """The group's shards of each FlatParameter must cover every original element exactly
        once; twice or more means the group is not FSDP's shard group (HYBRID_SHARD, or FSDP
        built with another process group): statistics would be over-counted."""
        groups = groups if groups is not None else range(len(optimizer.param_groups))
        flat = [p for gi in groups for p in optimizer.param_groups[gi]["params"] if is_flat_param(p)]
        if not flat:
            return
        held = torch.tensor([float(info.numel_in_shard if info.in_shard else 0)
                             for p in flat for info in p._shard_param_infos], dtype=torch.float64)
        self.reducer.all_reduce_(held)
        want = torch.tensor([float(n) for p in flat for n in p._numels], dtype=torch.float64)
        if not torch.equal(held, want):
            raise ValueError(
                f"{type(optimizer).__name__}: across the {self.reducer.world_size} ranks of the "
                "reduction group, the FSDP1 shards hold some original tensors more than once "
                f"(elements held {held.tolist()[:6]} vs sizes {want.tolist()[:6]}). Pass "
                "process_group= the group FSDP1 shards over; HYBRID_SHARD is not supported "
                "(use FSDP2's HSDP)")

    def import_state(self, optimizer, sd, extra) -> dict:
        """Put back the state FSDP1 leaves out for empty pieces (``use_orig_params=True``).

        torch's ``FSDP.optim_state_dict_to_load`` (which ``set_optimizer_state_dict`` calls)
        gives a rank no state at all for an original parameter it holds no element of
        (torch/distributed/fsdp/_optim_utils.py, ``_shard_orig_param_state`` returns ``{}``
        and ``_flatten_optim_state_dict`` drops it): it expects torch.optim's lazy state,
        which AdamW never creates for such a piece (its gradient is None). Ours is eager and
        read for every tensor, so the load would leave ``state[p]`` empty and the next step
        fail. The piece gets its eager state back: empty m, v, mu, and the tensor's step
        count from the ranks that hold part of it (one small all-reduce over the group,
        done on every rank whenever the optimizer has such pieces, so all ranks call it).
        """
        saved = [k for g in sd["param_groups"] for k in g["params"]]
        params = [p for g in optimizer.param_groups for p in g["params"]]
        pieces = [(k, p) for k, p in zip(saved, params) if not is_flat_param(p)]
        if not pieces:
            return sd
        state = dict(sd["state"])
        counts = torch.zeros(2 * len(pieces), dtype=torch.float64)
        for j, (k, _) in enumerate(pieces):
            st = state.get(k)
            if st and "step" in st:
                counts[2 * j], counts[2 * j + 1] = float(st["step"]), 1.0
        self.reducer.all_reduce_(counts)
        for j, (k, p) in enumerate(pieces):
            if p.numel() == 0 and not state.get(k):
                held = float(counts[2 * j + 1])
                step = float(counts[2 * j]) / held if held else 0.0
                dtype = optimizer.state_dtype_for(p)
                state[k] = {"step": torch.tensor(step),
                            **{key: torch.zeros(0, dtype=dtype, device=p.device)
                               for key in STATE_KEYS[1:]}}
        return {**sd, "state": state}

    def tensors(self, optimizer) -> list[TensorRef]:
        refs, i = [], 0
        for _, _, gi, group, p in tensor_layers(optimizer):
            fixed = group.get("layer_index")
            for _ in range(len(p._numels) if is_flat_param(p) else 1):
                refs.append(TensorRef(i, i if fixed is None else fixed, gi, p))
                i += 1
        return refs

    def pieces(self, optimizer, with_grad: bool = True) -> list[Segment]:
        segs = []
        by_param: dict[int, list[TensorRef]] = {}
        for ref in self.tensors(optimizer):
            by_param.setdefault(id(ref.param), []).append(ref)
        name = type(optimizer).__name__
        for group in optimizer.param_groups:
            for p in group["params"]:
                refs = by_param[id(p)]
                if with_grad and p.grad is None:
                    continue
                if with_grad and (p.grad.is_sparse or p.grad.shape != p.shape):
                    raise RuntimeError(f"{name}: unexpected gradient {tuple(p.grad.shape)} for an "
                                       f"FSDP parameter of shape {tuple(p.shape)}")
                st = optimizer.state[p]
                if not is_flat_param(p):
                    (ref,) = refs
                    segs.append(Segment(ref.index, ref.layer, ref.group, p.detach(), p.grad, st,
                                        p, lambda x: x.reshape(-1), self._starts[id(p)]))
                    continue
                for ref, info in zip(refs, p._shard_param_infos):
                    if not info.in_shard:
                        continue
                    a, e = info.offset_in_shard, info.offset_in_shard + info.numel_in_shard
                    local = {k: (v if k == "step" else v[a:e]) for k, v in st.items()}
                    grad = None if p.grad is None else p.grad[a:e]
                    segs.append(Segment(ref.index, ref.layer, ref.group, p.detach()[a:e], grad,
                                        local, p, lambda x, a=a, e=e: x.reshape(-1)[a:e],
                                        info.intra_param_start_idx))
        return segs
