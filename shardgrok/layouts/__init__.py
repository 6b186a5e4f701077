"""Layouts: the only code that knows how parameter storage is split across ranks.

A layout turns an optimizer's param groups into ``Segment``s (local views plus the global tensor
index they belong to). The math never looks past a segment; the reduction never looks inside one.
"""
from ..comm import LocalReducer
from .base import Layout, Segment
from .local import LocalLayout
from .zero import ZeroLayout


def select_layout(reducer) -> Layout:
    """LocalLayout on one process; ZeRO-1 over a process group."""
    if isinstance(reducer, LocalReducer):
        return LocalLayout(reducer)
    return ZeroLayout(reducer)


__all__ = ["Layout", "Segment", "LocalLayout", "ZeroLayout", "select_layout"]
