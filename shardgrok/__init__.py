"""shardgrok: GrokAdamW and SuperGrok for PyTorch, with ZeRO-style sharded state."""
from .checkpoint import consolidate_state_dict
from .checkpoint_files import load_checkpoint, save_checkpoint
from .distributed import DistInfo, init_distributed, shutdown_distributed
from .gradfilters import gradfilter_ema, gradfilter_ma
from .metanet import SimpleMetaNet
from .integrations.deepspeed import optimizer_of
from .integrations.deepspeed import register as register_deepspeed
from .optim import GrokAdamW, SuperGrok
from .recommended import recommended, recommended_meta_schedule

register_deepspeed()  # torch.optim.GrokAdamW / SuperGrok for DeepSpeed's config "type"

__version__ = "0.1.0"
__all__ = ["GrokAdamW", "SuperGrok", "SimpleMetaNet", "gradfilter_ema", "gradfilter_ma",
           "recommended", "recommended_meta_schedule", "consolidate_state_dict",
           "save_checkpoint", "load_checkpoint",
           "init_distributed", "shutdown_distributed", "DistInfo", "register_deepspeed",
           "optimizer_of", "__version__"]
