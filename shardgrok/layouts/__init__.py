"""Layouts: the only code that knows how parameter storage is split across ranks.

A layout turns an optimizer's param groups into ``Segment``s (local views plus the global tensor
index they belong to). The math never looks past a segment; the reduction never looks inside one.

| parameters                                  | layout        | who makes them whole |
|---------------------------------------------|---------------|----------------------|
| plain tensors, one process or ``shard=False``| LocalLayout   | (already whole)      |
| plain tensors in a torchrun/DDP job          | ZeroLayout    | our all-gather       |
| DTensors (FSDP2 ``fully_shard``, HSDP)       | FSDP2Layout   | FSDP2                |
| FlatParameters / FSDP1 original params       | FSDP1Layout   | FSDP1                |
| DeepSpeed ZeRO 1-3 flat fp32 partitions      | DeepSpeedLayout (``integrations/deepspeed.py``), switched to at the first step | DeepSpeed |
"""
from ..comm import LocalReducer, default_reducer
from .base import Layout, Segment, TensorRef
from ..placement import is_dtensor
from .fsdp import FSDP1Layout, FSDP2Layout, is_fsdp1
from .local import LocalLayout
from .zero import ZeroLayout


def select_layout(params, shard: bool | None, process_group) -> Layout:
    """The layout for an optimizer whose first param group holds ``params``."""
    params = list(params)
    engine_sharded = [p for p in params if is_dtensor(p) or is_fsdp1(p)]
    if engine_sharded:
        if shard is False:
            raise ValueError("shard=False cannot apply to FSDP-sharded parameters (they are "
                             "already split across ranks); drop shard=False")
        if is_dtensor(engine_sharded[0]):
            return FSDP2Layout(engine_sharded[0], process_group)
        return FSDP1Layout(process_group)
    reducer = default_reducer(process_group, shard)
    if isinstance(reducer, LocalReducer):
        return LocalLayout(reducer)
    return ZeroLayout(reducer)


__all__ = ["Layout", "Segment", "TensorRef", "LocalLayout", "ZeroLayout", "FSDP1Layout",
           "FSDP2Layout", "select_layout"]
