from .base import GrokOptimizerBase
from .grokadamw import GrokAdamW
from .supergrok import SuperGrok

__all__ = ["GrokOptimizerBase", "GrokAdamW", "SuperGrok"]
