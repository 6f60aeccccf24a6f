"""BAM's speed layer: the same function as :class:`bam_zoo.layers.BAM`'s definition, faster on the CPU.

Eager mode calls it directly (an ``autograd.Function`` whose backward reuses the branches' graphs); whatever records a
graph (FX, ``jit.trace``, ``torch.compile``, ``torch.export``) records one custom op, ``bam_zoo::bam_forward``
(backward ``bam_zoo::bam_backward``), so graphs run exactly what eager runs. The kernels take float32 CPU maps; other
inputs reaching the op run the definition's ops inside it. Each of :data:`COMPONENTS` can be switched off for an
ablation (:func:`components_off`, ``BAM_ZOO_CPU_OFF``); ``docs/performance.md`` describes them and the design.
"""
import contextlib
import os
import weakref
from typing import TYPE_CHECKING, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.activations import Sigmoid as TimmSigmoid
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

if TYPE_CHECKING:
    from .bam import BAM

__all__ = ["cpu_fast_path_applies", "bam_cpu_forward", "disable_cpu_fast_path", "native_kernels_available",
           "few_channel_conv", "COMPONENTS", "components_off", "component_enabled"]


# ---- The compiled kernels (bam_zoo._native) ------------------------------------------------------------------

NATIVE = os.environ.get("BAM_ZOO_NATIVE_GATE", "") != "0"
if NATIVE:
    try:
        from .. import _native  # noqa: F401  (registers torch.ops.bam_zoo.*)
    except ImportError:  # installed without a compiler, or built for another torch
        NATIVE = False


def native_kernels_available() -> bool:
    """Whether the compiled kernels of ``bam_zoo._native`` are loaded (``BAM_ZOO_NATIVE_GATE=0`` turns them off)."""
    return NATIVE


# ---- The components and their switches -------------------------------------------------------------------------

COMPONENTS = ("gate", "node", "chain", "pool_reduce", "conv")
_OFF = frozenset(n.strip() for n in os.environ.get("BAM_ZOO_CPU_OFF", "").split(",") if n.strip())
if _OFF - set(COMPONENTS):
    raise ValueError(f"BAM_ZOO_CPU_OFF names unknown components {sorted(_OFF - set(COMPONENTS))}; "
                     f"choose from {list(COMPONENTS)}.")


def component_enabled(name: str) -> bool:
    """Whether a component of the speed layer is on (see :data:`COMPONENTS`)."""
    return name not in _OFF


@contextlib.contextmanager
def components_off(*names: str) -> Iterator[None]:
    """Switch components off inside the block (process-wide). A traced graph's op reads the switches when it runs,
    except ``node``, which decides at tracing time whether the graph holds the op at all."""
    global _OFF
    unknown = sorted(set(names) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {list(COMPONENTS)}")
    before, _OFF = _OFF, _OFF | set(names)
    try:
        yield
    finally:
        _OFF = before


# ---- BAM as flat op arguments ----------------------------------------------------------------------------------
#
# config (ints): [version, product, has_gamma, num_dilated k, pad_h, pad_w, dil_h, dil_w, channel BN state,
#                 spatial BN state x (k + 1), conv bias present x (k + 2)]; BN state 0: none (folded), 1: running
#                 statistics, 2: training (batch statistics where there is more than one value per channel).
# params: fc1.w, fc1.b, [bn.w, bn.b], fc2.w, fc2.b, then per spatial layer j = 0..k: conv_j.w, [conv_j.b],
#         [bn_j.w, bn_j.b]; conv_final.w, [conv_final.b]; [gamma].
# buffers: running_mean, running_var, num_batches_tracked of every BatchNorm, channel branch first.
# floats: (momentum, eps) of every BatchNorm, in the same order.
# Every graph holding the op holds the version, so caches and exports of another layout fail loudly.

_OP_VERSION = 1

class _Spec(NamedTuple):
    params: List[torch.Tensor]
    buffers: List[torch.Tensor]
    config: List[int]
    floats: List[float]


class _BN(NamedTuple):
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor
    training: bool
    momentum: float
    eps: float


class _Net(NamedTuple):
    """The op's flat arguments read back as BAM's layers."""
    product: bool
    fc1: Tuple[torch.Tensor, torch.Tensor]
    channel_bn: Optional[_BN]
    fc2: Tuple[torch.Tensor, torch.Tensor]
    convs: List[Tuple[torch.Tensor, Optional[torch.Tensor]]]  # conv_reduce, then the dilated ones
    bns: List[Optional[_BN]]  # after each of convs
    final: Tuple[torch.Tensor, Optional[torch.Tensor]]
    gamma: Optional[torch.Tensor]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    params: Sequence[torch.Tensor]  # the op's arguments it was read from
    buffers: Sequence[torch.Tensor]
    config: Sequence[int]
    floats: Sequence[float]

    @property
    def rd(self) -> int:
        return self.convs[0][0].shape[0]

    @property
    def updates_statistics(self) -> bool:
        return any(bn is not None and bn.training for bn in [self.channel_bn, *self.bns])


def _bn_state(bn: nn.Module) -> Optional[int]:
    """0 for a folded BatchNorm, 1/2 for the definition's in eval/training mode, None for anything else."""
    if type(bn) is nn.Identity:
        return 0
    if (not getattr(bn, "_single_sample_safe", False) or not (bn.affine and bn.track_running_stats)
            or bn.running_mean is None or bn.num_batches_tracked is None):
        return None
    return 2 if bn.training else 1


def _is_plain_conv(conv: nn.Module, one_by_one: bool) -> bool:
    """A stride-1 ungrouped zero-padded Conv2d: 1x1 unpadded, or else with odd kernels padded to keep the size."""
    if not (type(conv) is nn.Conv2d and conv.groups == 1 and conv.stride == (1, 1) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)):
        return False
    if one_by_one:
        return conv.kernel_size == (1, 1) and conv.padding == (0, 0)
    return conv.in_channels == conv.out_channels and all(
        k % 2 == 1 and p == d * (k - 1) // 2 for k, p, d in zip(conv.kernel_size, conv.padding, conv.dilation))


class _Layout(NamedTuple):
    """(module, name) of each op parameter and buffer, the BatchNorms (momentum, eps: read per call), the config."""
    params: List[Tuple[nn.Module, str]]
    buffers: List[Tuple[nn.Module, str]]
    bns: List[nn.Module]
    config: List[int]


def _layout_of(bam: "BAM") -> Optional[_Layout]:
    """BAM's layout, or None where its layers are not the definition's (then it runs as modules)."""
    ca, body, gate = bam.channel_attn, list(bam.spatial_attn.body), bam.gate
    if not (isinstance(gate, (nn.Sigmoid, TimmSigmoid)) or gate in (torch.sigmoid, F.sigmoid)) or len(body) % 3 != 1:
        return None
    fc1, fc2 = getattr(ca, "fc1", None), getattr(ca, "fc2", None)
    if type(fc1) is not nn.Linear or type(fc2) is not nn.Linear or fc1.bias is None or fc2.bias is None:
        return None
    if type(getattr(ca, "act", None)) is not nn.ReLU or any(type(a) is not nn.ReLU for a in body[2::3]):
        return None
    convs, bns, final = body[0:-1:3], body[1::3], body[-1]
    if not (_is_plain_conv(convs[0], True) and convs[0].dilation == (1, 1) and _is_plain_conv(final, True)
            and final.out_channels == 1):
        return None
    geometry = {(c.padding, c.dilation) for c in convs[1:]}
    if len(geometry) > 1 or not all(_is_plain_conv(c, False) for c in convs[1:]):
        return None
    padding, dilation = geometry.pop() if geometry else ((0, 0), (1, 1))
    states = [_bn_state(getattr(ca, "bn", None))] + [_bn_state(b) for b in bns]
    if any(s is None for s in states):
        return None
    layers = [fc1, ca.bn, fc2, *[m for pair in zip(convs, bns) for m in pair], final]
    params = [(m, n) for m in layers for n in ("weight", "bias") if getattr(m, n, None) is not None]  # not Identity
    if bam.gamma is not None:
        params.append((bam, "gamma"))
    norms = [bn for bn in (ca.bn, *bns) if type(bn) is not nn.Identity]
    buffers = [(bn, n) for bn in norms for n in ("running_mean", "running_var", "num_batches_tracked")]
    config = [_OP_VERSION, int(bam.fusion == "product"), int(bam.gamma is not None), len(convs) - 1, *padding,
              *dilation, *states, *[int(c.bias is not None) for c in (*convs, final)]]
    return _Layout(params, buffers, norms, config)


# Eager calls reuse a BAM's layout while its layers stay the same objects in the same modes (see _layout_key).
_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, Optional[_Layout]]]" = weakref.WeakKeyDictionary()


def _layout_key(bam: "BAM") -> Tuple[tuple, bool]:
    """What a cached layout depends on (layer objects, modes, gate, fusion, gamma), and whether a branch layer has
    hooks. Plain dict reads: this runs on every eager call."""
    modules = bam._modules
    channel, spatial = modules["channel_attn"], modules["spatial_attn"]
    body = spatial._modules["body"]
    layers = [channel, spatial, body, *channel._modules.values(), *body._modules.values()]
    hooked = any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in layers)
    key = (bam.fusion, id(bam.gate), id(bam._parameters.get("gamma")), *map(id, layers),
           *[m.training for m in layers])
    return key, hooked


def _spec_of(bam: "BAM") -> Optional[_Spec]:
    """BAM's flat op arguments, or None where its layers are not the definition's or a branch has hooks (which the
    op would not call)."""
    if _recording():  # once per trace: the plain walk, which the compilers trace through
        layout = None if _has_hooks(bam.channel_attn) or _has_hooks(bam.spatial_attn) else _layout_of(bam)
        if layout is None:
            return None
        params = [getattr(m, name) for m, name in layout.params]
        buffers = [getattr(m, name) for m, name in layout.buffers]
    else:
        key, hooked = _layout_key(bam)
        entry = _LAYOUTS.get(bam)
        if entry is None or entry[0] != key:
            entry = (key, _layout_of(bam))
            _LAYOUTS[bam] = entry
        layout = entry[1]
        if layout is None or hooked:
            return None
        params = [m._parameters[name] for m, name in layout.params]
        buffers = [m._buffers[name] for m, name in layout.buffers]
    floats = [v for bn in layout.bns for v in (bn.momentum if bn.momentum is not None else 0.1, bn.eps)]
    return _Spec(params, buffers, layout.config, floats)


def _unpack(params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor], config: Sequence[int],
            floats: Sequence[float]) -> _Net:
    if config[0] != _OP_VERSION:
        raise RuntimeError(f"This graph holds bam_zoo::bam_forward of argument version {config[0]}, but the installed "
                           f"bam_zoo implements version {_OP_VERSION}: trace, export or compile it again.")
    product, has_gamma, k, ph, pw, dh, dw = config[1:8]
    states, has_bias = config[8:k + 10], config[k + 10:]
    p, b, f = iter(params), iter(buffers), iter(floats)

    def bn(state: int) -> Optional[_BN]:
        return None if state == 0 else _BN(next(p), next(p), next(b), next(b), next(b), state == 2, next(f), next(f))

    fc1 = (next(p), next(p))
    channel_bn = bn(states[0])
    fc2 = (next(p), next(p))
    convs, bns = [], []
    for j in range(k + 1):
        convs.append((next(p), next(p) if has_bias[j] else None))
        bns.append(bn(states[1 + j]))
    final = (next(p), next(p) if has_bias[k + 1] else None)
    gamma = next(p) if has_gamma else None
    return _Net(bool(product), fc1, channel_bn, fc2, convs, bns, final, gamma, (ph, pw), (dh, dw), params, buffers,
                config, floats)


def _updates_statistics(config: Sequence[int]) -> bool:
    """Whether a BatchNorm of this config trains (updates its running statistics)."""
    return 2 in config[8:8 + config[3] + 2]


def _with_buffer_copies(net: _Net, params: Optional[Sequence[torch.Tensor]] = None) -> _Net:
    """``net`` (on ``params`` in its parameters' places, if given) with copies of its BatchNorm buffers: a
    recomputation updates those, not the model's."""
    params = net.params if params is None else params
    return _unpack(params, [b.clone() for b in net.buffers], net.config, net.floats)


# ---- Where the speed layer runs --------------------------------------------------------------------------------

def _recording() -> bool:
    """Whether a graph is being recorded (FX, jit.trace, dynamo, export): BAM then becomes one op in it."""
    return (is_fx_symbolic_tracing() or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or torch.compiler.is_exporting())


def _has_hooks(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in module.modules())


def _fast_input(x: torch.Tensor) -> bool:
    """A float32 CPU map, contiguous or channels_last, outside autocast: what the kernels were measured on."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def cpu_fast_path_applies(bam: "BAM", x: torch.Tensor) -> bool:
    """Whether ``bam(x)`` runs :func:`bam_cpu_forward`: the definition's layers without hooks, no attention map,
    not opted out, ``node`` on in training, and (unless an FX trace records the op) a :func:`_fast_input`."""
    if (torch.jit.is_scripting() or getattr(bam, "_cpu_fast_path_disabled", False) or bam.store_attention
            or torch.onnx.is_in_onnx_export()  # ONNX has no such op: the exporter takes the definition's ops
            or (bam.training and not component_enabled("node")) or _spec_of(bam) is None):
        return False
    if is_fx_symbolic_tracing():
        return True  # x is a Proxy: the op's own check decides when the graph runs
    compiling = torch.compiler.is_compiling() or torch.compiler.is_exporting()
    if not compiling and torch._C._len_torch_dispatch_stack() != 0:
        return False  # FlopCounterMode, FakeTensorMode, ...: the definition, op for op
    return _fast_input(x)


def disable_cpu_fast_path(model: nn.Module, disabled: bool = True) -> nn.Module:
    """Make every BAM in ``model`` run its plain definition on the CPU too (or again the fast path), e.g. for
    second derivatives, which the fast path does not compute. Returns ``model``."""
    for module in model.modules():
        if hasattr(module, "_cpu_fast_path_disabled"):  # every BAM has this switch (BAM.__init__ sets it)
            module._cpu_fast_path_disabled = disabled
    return model


def _channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is laid out N x H x W x C (a channels_last map with more than one channel)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if _channels_last(x) else torch.contiguous_format


def bam_cpu_forward(bam: "BAM", x: torch.Tensor) -> torch.Tensor:
    """``bam(x)`` the fast way (check :func:`cpu_fast_path_applies` first); while a graph is recorded, one
    ``bam_zoo::bam_forward`` node and copies of the updated running statistics into the buffers."""
    spec = _spec_of(bam)
    if _recording():
        out = torch.ops.bam_zoo.bam_forward(x, spec.params, spec.buffers, spec.config, spec.floats)
        if _updates_statistics(spec.config):  # the op returned updated copies; indexed, as FX cannot iterate them
            for i, buffer in enumerate(spec.buffers):
                buffer.copy_(out[1][i])
        return out[0]  # last, so that feature extraction (the last node of a module is its output) finds y
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in spec.params)):
        return BamFunction.apply(x, spec, *spec.params)
    return _forward(x, _unpack(spec.params, spec.buffers, spec.config, spec.floats), keep=False)[0]


# ---- The implementation ----------------------------------------------------------------------------------------

class _Plan(NamedTuple):
    fast: bool  # the kernels' input; else the definition's ops
    pool_reduce: bool
    chain: bool


def _plan(x: torch.Tensor, net: _Net) -> _Plan:
    """Which implementation runs, from shapes, layouts, structure and switches (never values: the fake agrees)."""
    tensors = [t for t in (*net.fc1, *net.fc2, *[w for conv in net.convs for w in conv], *net.final, net.gamma)
               if t is not None]
    if x.dim() != 4 or not _fast_input(x) or not all(t.dtype == torch.float32 and t.device.type == "cpu"
                                                     for t in tensors):
        return _Plan(False, False, False)
    n, _, h, w = x.shape
    narrow = NATIVE and net.rd ** 2 <= _SMALL_CONV_MAX_CHANNEL_PAIRS  # 1 or 2 reduced channels: the direct loops
    pool_reduce = (narrow and component_enabled("pool_reduce") and net.updates_statistics and _channels_last(x))
    chain = (narrow and component_enabled("chain") and all(bn is not None and bn.training for bn in net.bns)
             and all(bias is None for _, bias in net.convs[1:]) and n * h * w >= 2)
    return _Plan(True, pool_reduce, chain)


class _Saved(NamedTuple):
    """What the backward needs besides ``x`` and the parameters."""
    pooled: torch.Tensor  # N x C
    reduced: torch.Tensor  # N x rd x H x W
    channel_logits: torch.Tensor  # N x C
    spatial_logits: torch.Tensor  # N x HW

    def flat(self) -> List[torch.Tensor]:
        """As the op returns them: the reduction as its storage in memory order, as the fake cannot know its layout."""
        reduced = self.reduced.permute(0, 2, 3, 1) if _channels_last(self.reduced) else self.reduced
        return [self.pooled, reduced.reshape(-1), self.channel_logits, self.spatial_logits]

    @classmethod
    def unflat(cls, flat: Sequence[torch.Tensor], x: torch.Tensor, net: _Net, plan: "_Plan") -> "_Saved":
        pooled, reduced, channel_logits, spatial_logits = flat
        n, c, h, w = x.shape
        # the layout few_channel_conv (or pool_reduce) gave the reduction
        if not plan.pool_reduce and _conv_route(x, c, net.rd, (1, 1), (0, 0)) == "onednn" and _channels_last(x):
            reduced = reduced.view(n, h, w, net.rd).permute(0, 3, 1, 2)
        else:
            reduced = reduced.view(n, net.rd, h, w)
        return cls(pooled, reduced, channel_logits, spatial_logits)


class _Graph(NamedTuple):
    """The branches on the pooled and reduced maps; recorded in eager mode, the backward reuses them."""
    pooled: torch.Tensor
    reduced: Optional[torch.Tensor]  # None where the chain kernels run the spatial branch
    channel_logits: torch.Tensor
    spatial_logits: torch.Tensor
    chain: Optional["_ChainState"]


def _branches(pooled: torch.Tensor, reduced: torch.Tensor, net: _Net, plan: _Plan, graph: bool,
              reduced_in_place: bool) -> _Graph:
    """``graph``: record the branches with autograd, from ``pooled`` and (without the chain) ``reduced`` as leaves."""
    with torch.enable_grad() if graph else contextlib.nullcontext():
        if graph:
            pooled.requires_grad_()
        channel_logits = _channel_logits(pooled, net)
        if plan.chain:
            chain = _ChainState.forward(reduced.contiguous(), net)
            return _Graph(pooled, None, channel_logits, chain.logits, chain)
        if graph:
            reduced.requires_grad_()
        return _Graph(pooled, reduced, channel_logits, _spatial_logits(reduced, net, reduced_in_place), None)


def _forward(x: torch.Tensor, net: _Net, keep: bool, graph: bool = False
             ) -> Tuple[torch.Tensor, Optional[_Saved], Optional[_Graph]]:
    """``(y, saved, graph)``, updating ``net``'s BatchNorm buffers in place as the modules do. ``keep``: return what
    the backward needs; ``graph``: record the branches with autograd (eager training)."""
    plan = _plan(x, net)
    if not plan.fast:
        return _definition(x, net), None, None
    n, c, h, w = x.shape
    reduce_weight, reduce_bias = net.convs[0]
    if plan.pool_reduce:
        pooled, reduced = torch.ops.bam_zoo.pool_reduce(x, reduce_weight.reshape(net.rd, -1).contiguous(),
                                                        reduce_bias)
    else:
        pooled = x.sum((2, 3)) / (h * w)  # not mean: its backward is a full-size division, sum's a broadcast view
        reduced = few_channel_conv(x, reduce_weight, reduce_bias)
    branches = _branches(pooled, reduced, net, plan, graph, reduced_in_place=not keep)
    cl, sl = branches.channel_logits.detach(), branches.spatial_logits.detach()
    factors = _native_factors(x, cl, sl, net.product, net.gamma)
    y = _gate_forward(x, cl, sl, net.product, factors, net.gamma)
    saved = _Saved(pooled.detach(), reduced.detach(), cl.reshape(n, c), sl.reshape(n, h * w)) if keep else None
    return y, saved, branches if graph else None


def _backward(grad_y: torch.Tensor, x: torch.Tensor, params: Sequence[torch.Tensor], net: _Net,
              saved: Optional[_Saved], recorded: Optional[_Graph]) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    """Gradients for ``x`` and every parameter (in ``params`` order; None where one needs none). Without the
    ``recorded`` branches (the op) they are recomputed from the saved pool and reduction: same inputs, same ops."""
    plan = _plan(x, net)
    if not plan.fast:
        return _definition_backward(grad_y, x, params, net)
    n, c, h, w = x.shape
    channel_logits = saved.channel_logits.view(n, c, 1, 1)
    spatial_logits = saved.spatial_logits.view(n, 1, h, w)
    factors = _native_factors(x, channel_logits, spatial_logits, net.product, net.gamma)
    grad_x, grad_c, grad_s, grad_gamma = _gate_backward(grad_y, x, channel_logits, spatial_logits, net.product,
                                                        factors, net.gamma)
    wanted = [p for p in params if p.requires_grad]
    if recorded is None:  # buffer copies: the forward already updated the statistics
        recorded = _branches(saved.pooled.detach(), saved.reduced.detach(),
                             _with_buffer_copies(net), plan, graph=True, reduced_in_place=False)
    pooled, reduced, chain = recorded.pooled, recorded.reduced, recorded.chain
    grads: Dict[int, Optional[torch.Tensor]] = {}
    if net.gamma is not None:
        grads[id(net.gamma)] = grad_gamma
    if chain is not None:
        grad_reduced, chain_grads = chain.backward(grad_s, net)
        grads.update(chain_grads)
        leaves = [p for p in wanted if id(p) not in grads]
        outs = torch.autograd.grad([recorded.channel_logits], [pooled] + leaves,
                                   [grad_c.view_as(recorded.channel_logits)], allow_unused=True)
        grad_pooled, branch_grads = outs[0], outs[1:]
    else:
        leaves = [p for p in wanted if id(p) not in grads]
        outs = torch.autograd.grad([recorded.channel_logits, recorded.spatial_logits], [pooled, reduced] + leaves,
                                   [grad_c.view_as(recorded.channel_logits), grad_s.view_as(recorded.spatial_logits)],
                                   allow_unused=True)
        grad_pooled, grad_reduced, branch_grads = outs[0], outs[1], outs[2:]
    grads.update({id(p): g for p, g in zip(leaves, branch_grads)})
    reduce_weight, reduce_bias = net.convs[0]
    rd = net.rd
    weight = reduce_weight.detach().reshape(rd, c)
    grad_pooled = grad_pooled / (h * w)
    if plan.pool_reduce:
        grad_reduced = grad_reduced.contiguous()
        grad_weight = torch.ops.bam_zoo.pool_reduce_backward_(grad_x, x, grad_reduced, weight.contiguous(),
                                                              grad_pooled.contiguous())
    elif _channels_last(x):  # dX (N x HW x C) += [dred | 1] (N x HW x (rd + 1)) @ [W ; dpool / HW] ((rd + 1) x C)
        rows = x.permute(0, 2, 3, 1).reshape(n, h * w, c)
        grad_rows = grad_reduced.permute(0, 2, 3, 1).reshape(n, h * w, rd)
        lhs = torch.cat([grad_rows, grad_rows.new_ones(n, h * w, 1)], dim=2)
        rhs = torch.cat([weight.expand(n, -1, -1), grad_pooled.unsqueeze(1)], dim=1)
        grad_x.permute(0, 2, 3, 1).view(n, h * w, c).baddbmm_(lhs, rhs)
        grad_weight = grad_rows.reshape(n * h * w, rd).t().mm(rows.reshape(n * h * w, c))
    else:  # rows are channels: dX (N x C x HW) += [W^T | dpool / HW] @ [dred ; 1]
        grad_rows = grad_reduced.reshape(n, rd, h * w)
        weight_t = weight.t().expand(n, -1, -1)  # a view, no copy
        lhs = torch.cat([weight_t, grad_pooled.unsqueeze(2)], dim=2)
        rhs = torch.cat([grad_rows, grad_rows.new_ones(n, 1, h * w)], dim=1)
        grad_x.view(n, c, h * w).baddbmm_(lhs, rhs)
        grad_weight = torch.bmm(grad_rows, x.view(n, c, h * w).transpose(1, 2)).sum(0)
    grads[id(reduce_weight)] = grad_weight.view(reduce_weight.shape)
    if reduce_bias is not None:
        grads[id(reduce_bias)] = grad_reduced.sum((0, 2, 3))
    return grad_x, [_in_strides_of(p, grads[id(p)]) if p.requires_grad and grads.get(id(p)) is not None else None
                    for p in params]


def _in_strides_of(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` laid out like ``param`` (channels_last weights), so DDP's buckets take it without a copy."""
    return grad if grad.stride() == param.stride() else torch.empty_like(param).copy_(grad)


def _batch_norm(x: torch.Tensor, bn: _BN) -> torch.Tensor:
    """The definition's ``single_sample_safe_batch_norm``: running statistics where batch ones are undefined."""
    use_batch_stats = bn.training and x.numel() > x.shape[1]
    if use_batch_stats:
        bn.num_batches_tracked.add_(1)
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, use_batch_stats, bn.momentum,
                        bn.eps)


def _channel_logits(pooled: torch.Tensor, net: _Net) -> torch.Tensor:
    """``ChannelAttn``'s MLP on already pooled N x C values, as N x C x 1 x 1 logits."""
    hidden = F.linear(pooled, *net.fc1)
    if net.channel_bn is not None:
        hidden = _batch_norm(hidden, net.channel_bn)
    return F.linear(torch.relu_(hidden), *net.fc2)[:, :, None, None]


def _spatial_logits(reduced: torch.Tensor, net: _Net, reduced_in_place: bool) -> torch.Tensor:
    """``SpatialAttn``'s body after ``conv_reduce``; ``reduced_in_place``: the first ReLU may overwrite ``reduced``
    (when no BatchNorm precedes it and nothing keeps ``reduced``)."""
    h = reduced
    for j, bn in enumerate(net.bns):
        if j > 0:
            h = few_channel_conv(h, *net.convs[j], net.padding, net.dilation)
        if bn is not None:
            h = _batch_norm(h, bn)
        h = torch.relu(h) if h is reduced and not reduced_in_place else torch.relu_(h)
    return few_channel_conv(h, *net.final)


def _definition(x: torch.Tensor, net: _Net) -> torch.Tensor:
    """BAM's definition (``layers/bam.py``) op for op, for inputs outside the kernels (e.g. a traced graph on CUDA)."""
    channel_logits = _channel_logits(x.mean((2, 3)), net)
    h = x
    for j, bn in enumerate(net.bns):
        h = F.conv2d(h, *net.convs[j], 1, net.padding if j else 0, net.dilation if j else 1)
        if bn is not None:
            h = _batch_norm(h, bn)
        h = torch.relu_(h)
    spatial_logits = F.conv2d(h, *net.final)
    logits = channel_logits * spatial_logits if net.product else channel_logits + spatial_logits
    attention = torch.sigmoid(logits)
    if net.gamma is not None:
        return x + net.gamma[:, None, None] * (x * attention)
    return x * (1 + attention)


def _definition_backward(grad_y: torch.Tensor, x: torch.Tensor, params: Sequence[torch.Tensor], net: _Net
                         ) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    """Gradients of :func:`_definition`, recomputed with autograd (buffer copies: statistics already updated)."""
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_() for p in params]
        twin = _with_buffer_copies(net, leaves)
        x_leaf = x.detach().requires_grad_()
        grads = torch.autograd.grad(_definition(x_leaf, twin), [x_leaf] + leaves, grad_y, allow_unused=True)
    return grads[0], list(grads[1:])


class BamFunction(torch.autograd.Function):
    """BAM as one autograd node in eager mode: :func:`_forward` recording the branches, :func:`_backward` reusing
    them. Every parameter is an input, so ``autograd.grad``, DDP and gradient hooks see them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: _Spec, *params: torch.Tensor) -> torch.Tensor:
        net = _unpack(params, spec.buffers, spec.config, spec.floats)
        y, saved, recorded = _forward(x.detach(), net, keep=True, graph=True)
        ctx.save_for_backward(x)
        ctx.state = (params, net, saved, recorded)  # the parameters themselves: the recorded graphs hold them
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "BAM's fused CPU path computes first derivatives only, and this backward asked for a graph "
                "(create_graph=True, e.g. a gradient penalty). Call bam_zoo.layers.disable_cpu_fast_path(model) "
                "first to run BAM's plain, twice-differentiable definition.")
        x, = ctx.saved_tensors
        (params, net, saved, recorded), ctx.state = ctx.state, None  # the branch graphs go with this call
        grad_x, grad_params = _backward(grad_y, x.detach(), params, net, saved, recorded)
        return (grad_x, None, *grad_params)


# ---- The custom ops: what traced and compiled graphs hold ---------------------------------------------------------

@torch.library.custom_op("bam_zoo::bam_forward", mutates_args=())
def _bam_forward_op(x: torch.Tensor, params: List[torch.Tensor], buffers: List[torch.Tensor], config: List[int],
                    floats: List[float]) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """BAM's forward: ``(y, updated copies of the buffers (training), what the backward needs)``."""
    net = _unpack(params, buffers, config, floats)
    if net.updates_statistics:  # the forward updates these copies, which the op returns
        net = _with_buffer_copies(net)
    y, saved, _ = _forward(x, net, keep=True)
    flat = saved.flat() if saved is not None else []
    return y.contiguous(memory_format=_format(x)), net.buffers if net.updates_statistics else [], flat


@_bam_forward_op.register_fake
def _bam_forward_fake(x, params, buffers, config, floats):
    net = _unpack(params, buffers, config, floats)
    plan = _plan(x, net)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_format(x))
    new_buffers = [torch.empty_like(b) for b in buffers] if net.updates_statistics else []
    if not plan.fast:
        return y, new_buffers, []
    n, c, h, w = x.shape
    return y, new_buffers, [x.new_empty((n, c)), x.new_empty((n * net.rd * h * w,)), x.new_empty((n, c)),
                            x.new_empty((n, h * w))]


@contextlib.contextmanager
def _autograd_inside_op() -> Iterator[None]:
    """Autograd back on inside a custom op's kernel (which runs below autograd): the backward differentiates the
    branches it recomputes."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                torch._C.DispatchKey.AutogradCPU):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        yield


@torch.library.custom_op("bam_zoo::bam_backward", mutates_args=())
def _bam_backward_op(grad_y: torch.Tensor, x: torch.Tensor, params: List[torch.Tensor], buffers: List[torch.Tensor],
                     saved: List[torch.Tensor], config: List[int], floats: List[float]
                     ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Gradients of ``bam_forward`` for ``x`` and every parameter (zeros where a parameter does not reach ``y``)."""
    with _autograd_inside_op(), torch.no_grad():  # the recomputed branches record their graphs again
        leaves = [p.detach().requires_grad_() for p in params]
        net = _unpack(leaves, buffers, config, floats)
        plan = _plan(x, net)
        saved_parts = _Saved.unflat(saved, x, net, plan) if plan.fast else None
        grad_x, grads = _backward(grad_y.contiguous(memory_format=_format(x)), x, leaves, net, saved_parts, None)
    grads = [torch.zeros_like(p) if g is None else _in_strides_of(p, g) for p, g in zip(params, grads)]
    return grad_x.contiguous(memory_format=_format(x)), grads


@_bam_backward_op.register_fake
def _bam_backward_fake(grad_y, x, params, buffers, saved, config, floats):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_format(x)),
            [torch.empty_like(p) for p in params])


def _bam_forward_setup(ctx, inputs, output) -> None:
    x, params, buffers, config, floats = inputs
    _, new_buffers, saved = output
    ctx.mark_non_differentiable(*new_buffers, *saved)
    ctx.save_for_backward(x, *params, *saved)
    ctx.layout = (len(params), config, floats)
    ctx.buffers = buffers  # not saved: training overwrites them with the updated statistics, which it may


def _bam_forward_backward(ctx, grad_y, grad_new_buffers, grad_saved):
    num_params, config, floats = ctx.layout
    x, *rest = ctx.saved_tensors
    params, saved = rest[:num_params], rest[num_params:]
    grad_x, grad_params = torch.ops.bam_zoo.bam_backward(grad_y, x, params, ctx.buffers, saved, config, floats)
    # torch.library matches the inputs' structure: a fused BAM (no BatchNorm) has an empty list of floats
    return grad_x, list(grad_params), [None] * len(ctx.buffers), None, None if floats else []


_bam_forward_op.register_autograd(_bam_forward_backward, setup_context=_bam_forward_setup)


# ---- Few-channel convolutions -----------------------------------------------------------------------------------

_SMALL_CONV_MAX_CHANNEL_PAIRS = 4  # direct loops beat oneDNN up to here (4 -> 4 at 7 x 7 is a tie)
_MATMUL_MAX_OUT_CHANNELS = 4  # 1x1 convolutions with at most this many outputs, or on maps of at least
_MATMUL_MIN_PIXELS = 400  # this many pixels, run as a matrix product


def _conv_route(x: torch.Tensor, in_channels: int, out_channels: int, kernel: Tuple[int, int],
                padding: Tuple[int, int]) -> str:
    """How :func:`few_channel_conv` computes a stride-1 convolution of ``x``: ``"small"`` (direct loops), 1 -> 1
    channel as ``"scale"`` (1x1) or ``"shifted"`` multiply-adds, 1x1 as a matrix product (``"gemm"`` channels_last,
    ``"bmm"`` NCHW), else ``"onednn"`` (``F.conv2d``)."""
    if not component_enabled("conv"):
        return "onednn"
    if NATIVE and in_channels * out_channels <= _SMALL_CONV_MAX_CHANNEL_PAIRS and x.dtype == torch.float32:
        return "small"
    one_by_one = kernel == (1, 1) and padding == (0, 0)
    if in_channels == 1 and out_channels == 1:
        return "scale" if one_by_one else "shifted"
    if not one_by_one:
        return "onednn"
    if _channels_last(x):  # oneDNN's 1x1 kernels beat a GEMM from a handful of outputs on
        return "gemm" if out_channels <= _MATMUL_MAX_OUT_CHANNELS else "onednn"
    if not x.is_contiguous():
        return "onednn"
    if out_channels <= _MATMUL_MAX_OUT_CHANNELS or x.shape[2] * x.shape[3] >= _MATMUL_MIN_PIXELS:
        return "bmm"
    return "onednn"


def few_channel_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     padding: Tuple[int, int] = (0, 0), dilation: Tuple[int, int] = (1, 1)) -> torch.Tensor:
    """A stride-1 ``F.conv2d`` for the one- to four-channel convolutions of small BAMs (``rd_channels`` 1 or 2 in
    CIFAR ResNets), which oneDNN runs several times slower than their size warrants (routes: :func:`_conv_route`)."""
    out_channels, in_channels = weight.shape[:2]
    route = _conv_route(x, in_channels, out_channels, tuple(weight.shape[2:]), tuple(padding))
    if route == "small" and weight.dtype != torch.float32:
        route = "onednn"
    if route == "onednn":
        return F.conv2d(x, weight, bias, 1, padding, dilation)
    if route == "small":
        return _small_conv(x.contiguous(), weight, bias, padding, dilation)  # a one- or two-channel map
    n, c, h, w = x.shape
    if weight.requires_grad and torch.is_grad_enabled():
        weight = KeepGradStrides.apply(weight)  # the rewrites below reshape it: keep its gradient's strides
    if route == "scale":
        y = x * weight.view(1, 1, 1, 1)
        return y if bias is None else y + bias.view(1, 1, 1, 1)
    if route == "shifted":
        return _single_channel_conv(x, weight, bias, padding, dilation)
    if route == "gemm":  # (N*H*W) x C rows times C x C_out: one GEMM, output channels_last
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
        matrix = weight.view(out_channels, c).t()
        y = rows.mm(matrix) if bias is None else torch.addmm(bias, rows, matrix)
        y = y.view(n, h, w, out_channels).permute(0, 3, 1, 2)
        # a map this narrow is cheaper NCHW for what follows (BatchNorm, ReLU, the direct loops): a small copy
        return y.contiguous()
    # bmm against the broadcast weight; torch.matmul would fold x into a transposed copy and save it
    weight = weight.view(1, out_channels, c).expand(n, -1, -1)
    if bias is None:
        y = torch.bmm(weight, x.view(n, c, h * w))
    else:
        y = torch.baddbmm(bias.view(1, -1, 1).expand(n, -1, h * w), weight, x.view(n, c, h * w))
    return y.view(n, out_channels, h, w)


def _single_channel_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         padding: Tuple[int, ...], dilation: Tuple[int, ...]) -> torch.Tensor:
    """A 1 -> 1 channel stride-1 convolution as k*k shifted multiply-adds of the zero-padded map."""
    kh, kw = weight.shape[2], weight.shape[3]
    (ph, pw), (dh, dw) = padding, dilation
    h_out = x.shape[2] + 2 * ph - dh * (kh - 1)
    w_out = x.shape[3] + 2 * pw - dw * (kw - 1)
    padded = F.pad(x, (pw, pw, ph, ph))
    y = None
    for i in range(kh):
        for j in range(kw):
            tap = padded[:, :, i * dh:i * dh + h_out, j * dw:j * dw + w_out] * weight[0, 0, i, j]
            y = tap if y is None else y + tap
    return y if bias is None else y + bias.view(1, 1, 1, 1)


class KeepGradStrides(torch.autograd.Function):
    """Identity whose gradient has its input's exact strides: gradients through ``view`` come back contiguous, which
    for a channels_last weight DDP's buckets copy and warn about."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.layout = (tensor.shape, tensor.stride())
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        shape, stride = ctx.layout
        return grad if grad.stride() == stride else torch.empty_strided(shape, stride, dtype=grad.dtype).copy_(grad)


class SmallConvFunction(torch.autograd.Function):
    """Autograd for ``torch.ops.bam_zoo.small_conv_*`` (direct loops for convolutions of one to four channels)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: List[int],
                dilation: List[int]) -> torch.Tensor:
        ctx.weight_strides = weight.stride()
        weight = weight.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.geometry = (padding, dilation)
        ctx.has_bias = bias is not None
        return torch.ops.bam_zoo.small_conv_forward(x, weight, bias, padding, dilation)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        grad_x, grad_w, grad_b = torch.ops.bam_zoo.small_conv_backward(
            grad_out.contiguous(), x, weight, *ctx.geometry)
        # the weight's own strides (channels_last after model.to(memory_format=...)): DDP takes it without a copy
        grad_w = torch.empty_strided(grad_w.shape, ctx.weight_strides, dtype=grad_w.dtype).copy_(grad_w)
        return grad_x, grad_w, grad_b if ctx.has_bias else None, None, None


def _small_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: Sequence[int],
                dilation: Sequence[int]) -> torch.Tensor:
    """A convolution through the direct-loop kernels, on a contiguous ``x``."""
    bias = bias.contiguous() if bias is not None else None
    padding, dilation = list(padding), list(dilation)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return SmallConvFunction.apply(x, weight, bias, padding, dilation)
    return torch.ops.bam_zoo.small_conv_forward(x, weight.contiguous(), bias, padding, dilation)


# ---- The narrow spatial branch in training, as compiled kernels ---------------------------------------------------

class _ChainState:
    """The spatial branch after its reduction on one- or two-channel maps in training, as the ``spatial_body_*``
    kernels: as modules it is ~15 small ATen calls and autograd nodes each way, BatchNorm on one thread."""

    def __init__(self, logits: torch.Tensor, reduced: torch.Tensor, pres: List[torch.Tensor],
                 acts: List[torch.Tensor], stats: List[torch.Tensor]) -> None:
        self.logits, self.reduced, self.pres, self.acts, self.stats = logits, reduced, pres, acts, stats

    @classmethod
    def forward(cls, reduced: torch.Tensor, net: _Net) -> "_ChainState":
        bns, convs = net.bns, [w for w, _ in net.convs[1:]]
        with torch.no_grad():
            logits, pres, acts, stats = torch.ops.bam_zoo.spatial_body_forward(
                reduced, [bn.weight for bn in bns], [bn.bias for bn in bns], [bn.running_mean for bn in bns],
                [bn.running_var for bn in bns], [bn.momentum for bn in bns], [bn.eps for bn in bns],
                [w.contiguous() for w in convs], net.final[0].contiguous(), net.final[1], list(net.padding),
                list(net.dilation))
            for bn in bns:
                bn.num_batches_tracked.add_(1)
        return cls(logits, reduced, pres, acts, stats)

    def backward(self, grad_logits: torch.Tensor, net: _Net) -> Tuple[torch.Tensor, Dict[int, torch.Tensor]]:
        """``(d reduced, {id(parameter): gradient})`` for the chain's parameters."""
        bns, convs, (final_weight, final_bias) = net.bns, [w for w, _ in net.convs[1:]], net.final
        grad_reduced, grad_bn_w, grad_bn_b, grad_convs, grad_final_w, grad_final_b = \
            torch.ops.bam_zoo.spatial_body_backward(
                grad_logits, self.reduced.contiguous(), self.pres, self.acts, self.stats,
                [bn.weight.detach() for bn in bns], [w.detach().contiguous() for w in convs],
                final_weight.detach().contiguous(), list(net.padding), list(net.dilation))
        pairs = [(bn.weight, g) for bn, g in zip(bns, grad_bn_w)] + [(bn.bias, g) for bn, g in zip(bns, grad_bn_b)]
        pairs += [(w, g) for w, g in zip(convs, grad_convs)] + [(final_weight, grad_final_w)]
        if final_bias is not None:
            pairs.append((final_bias, grad_final_b))
        return grad_reduced, {id(p): g.view(p.shape) for p, g in pairs}


# ---- The gate -----------------------------------------------------------------------------------------------------

# The kernels compute sigmoid(Mc + Ms) as 1 / (1 + exp(-Mc) exp(-Ms)); within this bound the product is finite.
_NATIVE_MAX_LOGIT = 40.0


def _native_factors(x: torch.Tensor, channel_logits: torch.Tensor, spatial_logits: torch.Tensor, product: bool,
                    gamma: Optional[torch.Tensor] = None) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(exp(-Mc), exp(-Ms))`` as N x C and N x HW matrices where the kernels apply (sum fusion, no ``gamma``,
    float32 logits within the bound; NaN fails it, so NaNs propagate through the ATen gate), else None."""
    if not NATIVE or product or gamma is not None or not component_enabled("gate"):
        return None
    n, c, h, w = x.shape
    if not (channel_logits.dtype == spatial_logits.dtype == torch.float32):
        return None
    if channel_logits.shape != (n, c, 1, 1) or spatial_logits.shape != (n, 1, h, w):
        return None
    bound = torch.maximum(channel_logits.detach().abs().amax(), spatial_logits.detach().abs().amax())
    if not bool(bound <= _NATIVE_MAX_LOGIT):
        return None
    with torch.no_grad():
        return (torch.exp(-channel_logits.detach()).reshape(n, c).contiguous(),
                torch.exp(-spatial_logits.detach()).reshape(n, h * w).contiguous())


def _sigmoid_into(out: torch.Tensor, channel_logits: torch.Tensor, spatial_logits: torch.Tensor,
                  product: bool) -> torch.Tensor:
    """``out = sigmoid(Mc (+ or *) Ms)``: two passes over ``out``, no other full-size allocation."""
    if product:
        torch.mul(channel_logits, spatial_logits, out=out)
    else:
        torch.add(channel_logits, spatial_logits, out=out)
    return out.sigmoid_()


def _gate_forward(x: torch.Tensor, channel_logits: torch.Tensor, spatial_logits: torch.Tensor, product: bool,
                  factors: Optional[Tuple[torch.Tensor, torch.Tensor]], gamma: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
    """``x * (1 + g)`` (or ``x + gamma * (x * g)``), ``g = sigmoid(Mc (+ or *) Ms)``: one pass in the kernel, else
    ATen passes into one buffer."""
    if factors is not None:
        return torch.ops.bam_zoo.gate_forward(x, *factors)
    out = _sigmoid_into(torch.empty_like(x), channel_logits, spatial_logits, product)
    if gamma is not None:  # the definition's x + gamma * (x * g), over the gate buffer
        return torch.add(x, torch.mul(out.mul_(x), gamma.view(1, -1, 1, 1), out=out), out=out)
    return torch.addcmul(x, x, out, out=out)  # x + x * g; element-wise ops may overwrite what they read


def _gate_backward(grad_out: torch.Tensor, x: torch.Tensor, channel_logits: torch.Tensor,
                   spatial_logits: torch.Tensor, product: bool, factors: Optional[Tuple[torch.Tensor, torch.Tensor]],
                   gamma: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients for ``(x, Mc, Ms, gamma)``, with ``g`` recomputed and ``dz = dy * s * x * g * (1 - g)`` (``s``:
    gamma or 1): ``dx = dy * (1 + s * g)``; sum fusion ``dMc = sum_HW dz``, ``dMs = sum_C dz``; product fusion
    ``dMc = sum_HW dz Ms``, ``dMs = sum_C dz Mc``; ``dgamma = sum_NHW dy * x * g``."""
    n, c, h, w = x.shape
    if factors is not None:
        grad_x, grad_c, grad_s = torch.ops.bam_zoo.gate_backward(
            grad_out.contiguous(memory_format=_format(x)), x, *factors)
        return grad_x, grad_c.view(n, c, 1, 1), grad_s.view(n, 1, h, w), None
    gate = _sigmoid_into(torch.empty_like(x), channel_logits, spatial_logits, product)
    dz = torch.mul(grad_out, x)
    grad_gamma = None
    if gamma is not None:
        grad_gamma = (dz * gate).sum((0, 2, 3))
        dz.mul_(gamma.view(1, -1, 1, 1))
    torch.ops.aten.sigmoid_backward.grad_input(dz, gate, grad_input=dz)  # dz *= g * (1 - g), in place
    grad_c = (dz * spatial_logits if product else dz).sum((2, 3), keepdim=True)
    grad_s = (dz * channel_logits if product else dz).sum(1, keepdim=True)
    del dz  # freed before dx is written: never more than two full-size buffers
    if gamma is not None:
        gate.mul_(gamma.view(1, -1, 1, 1))
    grad_x = torch.addcmul(grad_out, grad_out, gate, out=gate)  # dy * (1 + s * g), over the gate buffer
    return grad_x, grad_c, grad_s, grad_gamma
