"""DeepSpeed ZeRO 1-3: the layout of the flat fp32 partitions DeepSpeed hands the optimizer.

ZeRO 1/2 and 3 take the optimizer built over the model's parameters and replace, in its param
groups, the parameters by flat fp32 partitions (stage 1/2: one per group; stage 3: one per
sub-group, shown to the optimizer only while it is stepped), and call ``step()`` once per group
(or sub-group). At the first such call the optimizer finds the ZeRO optimizer driving it
(:mod:`shardgrok.layouts.select`) and switches to :class:`DeepSpeedLayout`, which maps every
partition back to the original tensors with DeepSpeed's own per-parameter metadata: the
``_hp_mapping`` fragments of stage 1/2 (where each parameter's piece sits in the partition) and
the per-parameter partitions (``partition_numel()``) of stage 3. Every original tensor thus gets
its own statistics, gate, layer index and clip norm, reduced over the data-parallel group.

Clipping. DeepSpeed clips the gradients itself, over all groups at once, before calling the
optimizer, with the formula GrokAdamW uses (``min(1, c / (norm + 1e-6))``) and ``c`` the
config's ``"gradient_clipping"`` (DeepSpeed's default 1.0, GrokAdamW's default too). Under
DeepSpeed GrokAdamW therefore leaves clipping to DeepSpeed and requires the two values to agree
(an error says so otherwise). SuperGrok clips its own final gradient per param group as always;
DeepSpeed's clipping of the raw gradients comes on top unless the config sets
``"gradient_clipping": 0``.

The meta-step's views (:class:`_WholeModelView`, :class:`_Stage3View`) give SuperGrok's
meta-step the whole model, since between ``engine.backward`` and ``engine.step`` the training
gradients sit in DeepSpeed's own buffers.
"""
from __future__ import annotations

import sys
import warnings

import torch

from .. import reference as R
from ..comm import GroupReducer, ReplicatedReducer
from ..placement import host_copy, host_ready, to_host
from .base import Layout, Segment, TensorRef
from .local import autograd_validation_grads, averaged_validation_grads, whole

SCALES = frozenset(R.SCALE_KEYS.values())


def _caller_holding(opt, *markers: str):
    """The object up the call stack that holds ``opt`` as its ``.optimizer`` and has one of the
    ``markers`` attributes. DeepSpeed gives the optimizer it wraps no reference back, so the
    optimizer looks for its driver once, at the first step, state_dict or load_state_dict it
    receives, which DeepSpeed calls from its own methods."""
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if (obj is not None and obj is not opt and getattr(obj, "optimizer", None) is opt
                and any(hasattr(obj, m) for m in markers)):
            return obj
        frame = frame.f_back
    return None


def _find_zero_optimizer(opt):
    """The DeepSpeed optimizer driving ``opt`` with flat fp32 partitions."""
    return _caller_holding(opt, "single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",
                           "fp32_groups_flat_partition")


def engine_driving(opt):
    """The DeepSpeed engine calling ``opt`` directly (no ZeRO wrapper), if any."""
    return _caller_holding(opt, "zero_optimization_stage")


def accept_in_zero(cls: type) -> None:
    """Let ZeRO accept optimizers of type ``cls`` without ``zero_allow_untested_optimizer``
    (ZeRO checks the optimizer's exact type against its tested list). Needs DeepSpeed
    imported; idempotent."""
    from deepspeed.runtime.zero import utils as zero_utils
    if cls not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(cls)


def layout_for(opt) -> "DeepSpeedLayout":
    """The layout of an optimizer whose parameters a DeepSpeed ZeRO optimizer replaced by flat
    partitions (found at its first step, state_dict, load_state_dict or meta-step); raises,
    saying why, when no ZeRO optimizer is driving it or its arguments contradict ZeRO's."""
    params = [p for ps in opt.given_params for p in ps]
    z3 = next((p._z3_optimizer for p in params if hasattr(p, "_z3_optimizer")), None)
    linked = any(hasattr(p, "_hp_mapping") for p in params)  # ZeRO 1/2, BF16_Optimizer
    zero = z3 if z3 is not None else _find_zero_optimizer(opt)
    if zero is None and not linked:
        if _caller_holding(opt, "fp32_groups") is not None:
            raise NotImplementedError(
                f"{type(opt).__name__} under DeepSpeed's fp16/bf16 optimizer without ZeRO "
                "(FP16_UnfusedOptimizer) is not supported: it runs a zero-gradient step at "
                "start-up that would count as a real step (weight decay, step counts). Enable "
                "ZeRO (\"zero_optimization\": {\"stage\": 1}, 2 or 3) with bf16/fp16")
        raise RuntimeError(
            f"{type(opt).__name__}: its parameters were replaced by tensors it was not built "
            "with, and no DeepSpeed ZeRO optimizer is driving this step. Build the optimizer "
            "over the parameters it will step, and do not edit param_groups[i]['params']")
    if opt.get_global_step() > 0:
        raise RuntimeError(f"{type(opt).__name__} took steps before DeepSpeed wrapped it; "
                           "pass a fresh optimizer to deepspeed.initialize")
    shard, group = opt.shard_args
    if shard is False or group is not None:
        raise ValueError(f"{type(opt).__name__}(shard={shard!r}, process_group={group!r}) under "
                         "DeepSpeed ZeRO: DeepSpeed partitions the state and the statistics "
                         "are reduced over its data-parallel group; drop both arguments")
    return DeepSpeedLayout(opt, zero, stage3=z3 is not None)


class DeepSpeedLayout(Layout):
    """DeepSpeed ZeRO 1-3: the flat fp32 partitions, mapped back to the original tensors with
    DeepSpeed's own per-parameter metadata. State (m, v, mu) is flat like the partition and
    keyed by it, as DeepSpeed's checkpointing expects."""

    sharded = True

    def __init__(self, opt, zero, stage3: bool):
        # ``zero``: the DeepSpeed optimizer wrapping ``opt`` (for ZeRO 1/2 it may be found only
        # at the first step it drives; the map itself comes from the parameters' metadata)
        self.engine = zero
        self.stage3 = stage3
        if stage3:
            group = zero.dp_process_group
        else:
            group = next(p._dp_group for ps in opt.given_params for p in ps
                         if getattr(p, "_hp_mapping", None) is not None)
        self.reducer = GroupReducer(group)
        self._index = {id(p): i for i, p in enumerate(p for ps in opt.given_params for p in ps)}
        self._refs: list[TensorRef] = []
        # id(flat) -> pieces: (tensor, range in the flat, start of the piece in its tensor)
        self._pieces: dict[int, list[tuple[TensorRef, int, int, int]]] = {}
        self.flats: list[torch.Tensor] = []
        layer_of = {}
        i = 0
        for gi, g in enumerate(self.groups(opt)):
            fixed = g.get("layer_index")
            for p in opt.given_params[gi]:
                layer_of[id(p)] = (i if fixed is None else fixed, gi)
                i += 1
        if stage3:
            self._map_stage3(zero, layer_of)
        else:
            self._map_stage12(opt, layer_of)
        # Parameters DeepSpeed left out (requires_grad=False) still count as tensors (their
        # index and layer); they never have a piece, so any flat can hold their step counter.
        mapped = {r.index for r in self._refs}
        for ps in opt.given_params:
            for p in ps:
                if self._index[id(p)] not in mapped:
                    self._add_ref(p, layer_of, self.flats[0])
        self._refs.sort(key=lambda r: r.index)
        self._seen: set[int] = set()
        self._clipping_checked = False

    # ------------------------------------------------------------------ the map
    def _add_ref(self, p, layer_of, flat):
        layer, gi = layer_of[id(p)]
        ref = TensorRef(self._index[id(p)], layer, gi, flat)
        self._refs.append(ref)
        return ref

    def _map_stage12(self, opt, layer_of):
        """ZeRO 1/2 (and BF16_Optimizer): one flat fp32 partition per group, which DeepSpeed put
        in the group's params; each parameter's ``_hp_mapping`` says where its piece sits."""
        for gi, g in enumerate(self.groups(opt)):
            (flat,) = g["params"]
            self.flats.append(flat)
            pieces = self._pieces.setdefault(id(flat), [])
            for p in opt.given_params[gi]:
                ref = self._add_ref(p, layer_of, flat)
                frag = getattr(p, "_hp_mapping", None)
                if frag is not None:
                    a = frag.hp_fragment_address.start
                    pieces.append((ref, a, a + frag.hp_fragment_address.numel,
                                   frag.lp_fragment_address.start))

    def _map_stage3(self, zero, layer_of):
        rank = torch.distributed.get_rank(zero.dp_process_group)
        for s, params in enumerate(zero.fp16_groups):  # parameters; fp16_partitioned_groups
            # holds their partitions, flattened in this order into the sub-group's fp32 flat
            flat = zero.fp32_partitioned_groups_flat[s]
            self.flats.append(flat)
            pieces = self._pieces.setdefault(id(flat), [])
            offset = 0
            for p in params:
                ref = self._add_ref(p, layer_of, flat)
                size = p.partition_numel()
                held = max(0, min(size, p.ds_numel - rank * size))  # the last shards are padded
                if held:
                    pieces.append((ref, offset, offset + held, rank * size))
                offset += size

    # ------------------------------------------------------------------ layout protocol
    #: DeepSpeed clips the gradients (globally) before the optimizer sees them
    engine_clips = True

    def groups(self, opt):
        # ZeRO 1/2 shows the optimizer only [group i] during its call; the optimizer keeps the
        # whole list (the same dicts, in the same order as DeepSpeed's groups)
        return opt.all_param_groups

    def tensors(self, opt):
        return self._refs

    def _current_flats(self, opt):
        return [p for g in opt.param_groups for p in g["params"] if id(p) in self._pieces]

    def new_round(self, opt) -> bool:
        if not self._clipping_checked:  # the first step DeepSpeed drives: it is on the stack
            self.engine = self.engine or _find_zero_optimizer(opt)
            self.check_clipping(opt)
            self.check_checkpointing(opt)
            self._clipping_checked = True
        flats = {id(f) for f in self._current_flats(opt)}
        if not self._seen or flats & self._seen:
            self._seen = set(flats)
            return True
        self._seen |= flats
        return False

    #: 8-bit state: every tensor of a flat partition takes codes (the partition keeps one
    #: state format), and a block the partition boundary cuts gets one scale per rank
    #: (docs/deepspeed.md)
    takes_int8 = True

    def state_pieces(self, p: torch.Tensor) -> list[tuple[int, int, int]]:
        return [(a, e, start) for _, a, e, start in self._pieces.get(id(p), [])]

    def _segments(self, opt, flat, with_grad: bool) -> list[Segment]:
        st = opt.state[flat]
        quantized = R.is_quantized(st)
        pieces = self._pieces[id(flat)]
        scales = R.piece_scales([(a, e, start) for _, a, e, start in pieces])
        segs = []
        for (ref, a, e, start), (o, n) in zip(pieces, scales):
            local = {k: (v if k == "step" else v[o:o + n] if quantized and k in SCALES else v[a:e])
                     for k, v in st.items()}
            grad = None if not with_grad or flat.grad is None else flat.grad[a:e]
            segs.append(Segment(ref.index, ref.layer, ref.group, flat.detach()[a:e], grad,
                                local, flat, lambda x, a=a, e=e: x.reshape(-1)[a:e], start))
        return segs

    def pieces(self, opt, with_grad: bool = True) -> list[Segment]:
        flats = self._current_flats(opt) if with_grad else self.flats
        return [s for flat in flats if not (with_grad and flat.grad is None)
                for s in self._segments(opt, flat, True)]

    def plan_pieces(self, opt) -> list[Segment]:
        """The pieces of the flats this per-group call shows, with a gradient or not."""
        return [s for flat in self._current_flats(opt) for s in self._segments(opt, flat, False)]

    def plan_key(self, opt) -> tuple:
        return tuple(id(f) for f in self._current_flats(opt))

    def add_group(self, opt, gi):
        raise RuntimeError("add_param_group after deepspeed.initialize is not supported: "
                           "DeepSpeed has already partitioned the groups")

    # post_step: nothing; DeepSpeed copies the fp32 partitions to the model and all-gathers them

    def clip_coefficient(self):
        """The coefficient DeepSpeed applied to the gradients this step (for the report): a
        float, or a 0-dim tensor where DeepSpeed keeps its norm on the GPU (not read back)."""
        clip = float(getattr(self.engine, "clip_grad", 0.0) or 0.0)
        norm = getattr(self.engine, "_global_grad_norm", None)
        if clip <= 0 or norm is None:
            return 1.0
        if isinstance(norm, torch.Tensor):
            return (clip / (norm.detach().to(torch.float64) + 1e-6)).clamp(max=1.0)
        return min(1.0, clip / (float(norm) + 1e-6))

    def check_clipping(self, opt) -> None:
        clip = float(getattr(self.engine, "clip_grad", 0.0) or 0.0)
        name = type(opt).__name__
        for gi, g in enumerate(self.groups(opt)):
            mine = float(g.get("gradient_clipping", 0.0))
            if name == "GrokAdamW" and mine != clip:
                raise ValueError(
                    f"GrokAdamW(gradient_clipping={mine}) in param group {gi}, but DeepSpeed "
                    f"clips gradients itself with \"gradient_clipping\": {clip} (DeepSpeed's "
                    "default is 1.0), globally and with the same formula, before the optimizer "
                    "sees them. Under DeepSpeed GrokAdamW leaves clipping to DeepSpeed: set the "
                    "config's \"gradient_clipping\" to the value you want and GrokAdamW's to "
                    "the same")
        if name == "SuperGrok" and clip > 0:
            warnings.warn(f"DeepSpeed clips the raw gradients (\"gradient_clipping\": {clip}) "
                          "before SuperGrok, which clips its own final gradient per param group "
                          "as well; set \"gradient_clipping\": 0 in the DeepSpeed config for "
                          "SuperGrok's clipping alone", UserWarning, stacklevel=4)

    def check_checkpointing(self, opt) -> None:
        """8-bit state's scale vectors are not laid out like the partition: ZeRO 1/2's elastic
        checkpoints cut every state tensor by the partition's padding, which would cut them."""
        if getattr(self.engine, "elastic_checkpoint", False) and any(
                R.is_quantized(opt.state[f]) for f in self.flats if f in opt.state):
            raise ValueError(f"{type(opt).__name__}: state_dtype=\"int8\" with DeepSpeed's "
                             "\"elastic_checkpoint\": true is not supported (its checkpoints "
                             "cut every state tensor by the partition's padding, the per-block "
                             "scales too); leave \"elastic_checkpoint\" off (DeepSpeed's "
                             "default)")

    # meta-step and checkpoints
    def meta_view(self, opt) -> "_WholeModelView":
        return _Stage3View(opt, self) if self.stage3 else _WholeModelView(opt, self)

    def full_state(self, opt, sd, to):
        raise TypeError(f"{type(opt).__name__}.full_state_dict() is for ZeRO-sharded optimizers "
                        "without an engine; under DeepSpeed use engine.save_checkpoint")


class _WholeModelView(Layout):
    """The meta-step under ZeRO 1/2, between ``engine.backward`` and ``engine.step``: the
    training gradients are then in DeepSpeed's partitioned buffers, not in the flat partitions
    the step sees. Every rank assembles the whole gradients (DeepSpeed's ``safe_get_full_grad``,
    one all-reduce per parameter) and computes the whole meta-gradient on the model's own
    parameters, as one process would; the validation gradients are averaged over the ranks,
    so every rank gets the same meta-gradient and the meta-nets stay equal with no further
    reduction.

    Memory: each whole fp32 gradient is moved to the host as soon as it is assembled, so the
    device holds one of them at a time; the host holds them all (one fp32 model per rank) and
    the meta-step's smart gradients next to them, and what the look-ahead needs on the device
    goes there one tensor at a time."""

    def __init__(self, opt, ds: DeepSpeedLayout):
        from deepspeed.utils import safe_get_full_grad
        self.reducer = ReplicatedReducer(ds.reducer.group)
        self._params = [p for ps in opt.given_params for p in ps]
        self._grads = []
        for p in self._params:  # one all-reduce each, in the same order on every rank
            g = safe_get_full_grad(p)
            # a gradient the parameter already holds costs nothing more where it is
            self._grads.append(g if g is None or g is p.grad else to_host(g))
        host_ready()  # the meta-step reads them on the host
        self._refs = [TensorRef(r.index, r.layer, r.group, p)
                      for r, p in zip(ds.tensors(opt), self._params)]

    def tensors(self, opt):
        return self._refs

    def meta_params(self, opt):
        return self._params

    def pieces(self, opt, with_grad: bool = True):
        return [Segment(r.index, r.layer, r.group, p.detach(), g.reshape(p.shape), {}, p, whole, 0)
                for r, p, g in zip(self._refs, self._params, self._grads) if g is not None]

    def validation_grads(self, opt, val_closure):
        tensors = [p for p, g in zip(self._params, self._grads) if g is not None]
        return autograd_validation_grads(tensors, val_closure)

    def finish_validation_grads(self, opt, raw, segs):
        return averaged_validation_grads(self.reducer, raw, segs)


class _Stage3View(_WholeModelView):
    """The meta-step under ZeRO 3: the model's parameters live as per-rank partitions
    (``ds_tensor``), gathered only around their use (except "persistent" small ones, which stay
    whole in ``.data`` too). The look-ahead moves whole fp32 copies, writes each rank's part of
    them into its partitions (and into the whole data of persistent parameters), and puts the
    original storage back afterwards.

    Memory: the whole fp32 copies are gathered one parameter at a time and kept on the host, as
    are the gradients (see :class:`_WholeModelView`) and the saved partitions and persistent
    data, so the device holds one whole fp32 parameter or gradient at a time beyond what
    DeepSpeed holds; the host holds two fp32 models (parameters, gradients) per rank, plus
    the smart gradients and this rank's partitions."""

    #: the storage the look-ahead overwrites is put back by :meth:`restore`; the fp32 copies it
    #: moves are thrown away, so the meta-step need not save them
    restores_itself = True

    def __init__(self, opt, ds: DeepSpeedLayout):
        super().__init__(opt, ds)
        from deepspeed.utils import safe_get_full_fp32_param
        self._rank = torch.distributed.get_rank(ds.reducer.group)
        # frozen parameters have no fp32 master and are not moved (the same on every rank, so
        # the collective gathers stay matched)
        self._whole = [host_copy(safe_get_full_fp32_param(p)) if p.requires_grad else None
                       for p in self._params]
        host_ready()  # the look-ahead moves them on the host
        self._saved = [(host_copy(p.ds_tensor),
                        host_copy(p.data) if p.data.numel() == p.ds_numel else None)
                       for p in self._params]

    def meta_params(self, opt):
        return [w for w in self._whole if w is not None]

    def pieces(self, opt, with_grad: bool = True):
        return [Segment(r.index, r.layer, r.group, w, g.reshape(w.shape), {}, p, whole, 0)
                for r, p, w, g in zip(self._refs, self._params, self._whole, self._grads)
                if g is not None and w is not None]

    @torch.no_grad()
    def post_step(self, opt):
        for p, w in zip(self._params, self._whole):
            if w is None:
                continue
            size = p.ds_tensor.numel()
            part = w.reshape(-1)[self._rank * size:(self._rank + 1) * size]
            p.ds_tensor.view(-1)[:part.numel()].copy_(part)
            if p.data.numel() == p.ds_numel:
                p.data.copy_(w.view_as(p.data))

    @torch.no_grad()
    def restore(self, opt):
        for p, (part, data) in zip(self._params, self._saved):
            p.ds_tensor.copy_(part, non_blocking=part.is_pinned())
            if data is not None:
                p.data.copy_(data, non_blocking=data.is_pinned())
