"""Grokking demo: x*y mod 97 with AdamW, GrokAdamW and SuperGrok (``python -m shardgrok.demo``)."""
from .task import DemoConfig, run

__all__ = ["DemoConfig", "run"]
