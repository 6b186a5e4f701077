"""shardgrok: GrokAdamW and SuperGrok for PyTorch, with ZeRO-style sharded state."""
from .checkpoint import consolidate_state_dict
from .distributed import DistInfo, init_distributed
from .gradfilters import gradfilter_ema, gradfilter_ma
from .metanet import SimpleMetaNet
from .optim import GrokAdamW, SuperGrok

__version__ = "0.1.0"
__all__ = ["GrokAdamW", "SuperGrok", "SimpleMetaNet", "gradfilter_ema", "gradfilter_ma",
           "consolidate_state_dict", "init_distributed", "DistInfo", "__version__"]
