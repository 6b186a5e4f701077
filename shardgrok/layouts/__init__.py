"""Layouts: the only code that knows how parameter storage is split across ranks.

A layout turns an optimizer's param groups into ``Segment``s (local views plus the global tensor
index they belong to). The math never looks past a segment; the reduction never looks inside one.
"""
from .base import Layout, Segment
from .local import LocalLayout

__all__ = ["Layout", "Segment", "LocalLayout"]
