"""SuperGrok's meta-net, together: the per-element net and the normalisation around it
(:mod:`.net`), its exact piecewise-linear table for the kernels (:mod:`.table`), and its
training by the one-step look-ahead hypergradient (:mod:`.bilevel`)."""
from .net import SimpleMetaNet

__all__ = ["SimpleMetaNet"]
