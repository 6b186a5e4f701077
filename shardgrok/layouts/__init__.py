"""Layouts: the only code that knows how parameter storage is split across ranks.

A layout turns an optimizer's param groups into ``Segment``s (local views plus the global tensor
index they belong to). The math never looks past a segment; the reduction never looks inside
one. :mod:`.base` defines the interface, :mod:`.select` picks a layout (and switches when an
engine takes the optimizer over), and one module per parallelism implements it: :mod:`.local`
(one process), :mod:`.zero` (ZeRO-1 in a torchrun/DDP job), :mod:`.fsdp` (FSDP2 and FSDP1),
:mod:`.deepspeed` (DeepSpeed ZeRO 1-3).
"""
from .base import Layout, Segment, TensorRef
from .fsdp import FSDP1Layout, FSDP2Layout
from .local import LocalLayout
from .select import EngineWatch, LayoutSwitch, select_layout
from .zero import ZeroLayout

__all__ = ["Layout", "Segment", "TensorRef", "LocalLayout", "ZeroLayout", "FSDP1Layout",
           "FSDP2Layout", "select_layout", "EngineWatch", "LayoutSwitch"]
