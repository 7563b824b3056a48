"""The producer of a cross-iteration BatchNorm's input, read from the autograd graph,
and the derivatives of its output's moments with respect to its weight (not public).

How the producer is found. ``convert_model`` only sees the BatchNorm layers, and
``torch.fx`` cannot trace detection models, so the wiring is read from the autograd
graph of each training forward: the BN input's ``grad_fn`` is the node of the
convolution (``ConvolutionBackward0``) or linear layer (``AddmmBackward0`` /
``MmBackward0``) that made it. That node holds everything the derivatives need —
the producer's weight and bias (its ``AccumulateGrad`` leaves), the input autograd
saved for the weight gradient (no copy, no hook, no second forward pass), and the
stride, padding (after ``padding_mode``/``'same'`` handling), dilation and groups.
A BN fed straight by a conv or linear layer — torchvision ResNets, FPNs,
``Conv2dNormActivation`` in detection heads — is therefore found whatever the module
tree looks like; anything else between them (an addition, an activation, a
reshape) means "no producer". The node's private attributes are read through
:mod:`distnorm._compat`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from .._compat import accumulated_leaf, node_name, saved_argument

__all__ = ["CONV_TYPES", "Link", "Producer", "channel_derivatives", "link_of", "same_tensor"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Nodes between a weight leaf and the op that uses it: autocast's cast, Linear's
# transpose, a permutation.
_PASS_THROUGH = ("ToCopyBackward0", "TBackward0", "PermuteBackward0")


class Link(NamedTuple):
    """What the autograd node that produced a BN input tells about its layer."""

    kind: str                      # "conv" or "linear"
    weight: Optional[Tensor]       # the producer's weight leaf (None if it needs no grad)
    bias: Optional[Tensor]
    saved_weight: Optional[Tensor]  # the weight as autograd saved it (identity check)
    input: Tensor                  # the producer's input (as the layer consumed it)
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    groups: int


class Producer:
    """A plain (non-Module) holder, so the producer never enters the module tree or
    the state_dict. Either a module set by ``CrossIterationBatchNorm.attach``, or
    the weight/bias leaves found in the autograd graph."""

    __slots__ = ("module", "weight_leaf", "bias_leaf")

    def __init__(self, module: Optional[nn.Module] = None, weight: Optional[Tensor] = None,
                 bias: Optional[Tensor] = None) -> None:
        self.module, self.weight_leaf, self.bias_leaf = module, weight, bias

    @property
    def weight(self) -> Tensor:
        return self.module.weight if self.module is not None else self.weight_leaf  # type: ignore[return-value]

    @property
    def bias(self) -> Optional[Tensor]:
        return getattr(self.module, "bias", None) if self.module is not None else self.bias_leaf


def _leaf(fn: Any) -> Optional[Tensor]:
    """The leaf tensor behind ``fn``, through casts and transposes (autocast, Linear)."""
    for _ in range(4):
        if fn is None:
            return None
        leaf = accumulated_leaf(fn)
        if leaf is not None:
            return leaf
        if node_name(fn) not in _PASS_THROUGH or len(fn.next_functions) != 1:
            return None
        fn = fn.next_functions[0][0]
    return None


def link_of(x: Tensor) -> Optional[Link]:
    """The conv/linear layer whose output is ``x``, read from ``x.grad_fn``."""
    node = x.grad_fn
    if node is None:
        return None
    name = node_name(node)
    nexts = node.next_functions
    if name == "ConvolutionBackward0":
        transposed = saved_argument(node, "transposed")
        output_padding = saved_argument(node, "output_padding")
        if transposed is None or transposed or output_padding is None or any(output_padding):
            return None
        inp = saved_argument(node, "input")
        if inp is None:
            return None
        return Link("conv", _leaf(nexts[1][0]), _leaf(nexts[2][0]) if len(nexts) > 2 else None,
                    saved_argument(node, "weight"), inp,
                    tuple(saved_argument(node, "stride")), tuple(saved_argument(node, "padding")),
                    tuple(saved_argument(node, "dilation")), int(saved_argument(node, "groups")))
    if name in ("AddmmBackward0", "MmBackward0"):
        if name == "AddmmBackward0":
            if saved_argument(node, "alpha") != 1 or saved_argument(node, "beta") != 1:
                return None
            inp, bias, weight_fn = saved_argument(node, "mat1"), _leaf(nexts[0][0]), nexts[2][0]
        else:
            inp, bias, weight_fn = saved_argument(node, "self"), None, nexts[1][0]
        if inp is None or node_name(weight_fn) != "TBackward0" and weight_fn is not None:
            return None
        mat2 = saved_argument(node, "mat2")
        return Link("linear", _leaf(weight_fn), bias, mat2.t() if mat2 is not None else None,
                    inp, (), (), (), 1)
    return None


def same_tensor(a: Optional[Tensor], b: Tensor) -> bool:
    """Whether ``a`` is ``b`` or a view of the same memory with the same layout."""
    if a is None:
        return False
    if a is b:
        return True
    return (a.shape == b.shape and a.device == b.device and a.dtype == b.dtype
            and a.data_ptr() == b.data_ptr() and a.stride() == b.stride())


def channel_derivatives(link: Link, x: Tensor, weight_shape: torch.Size,
                        dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Local sums ``∂S/∂W`` (compact, ``(G, L)``) and ``∂Q/∂W`` (``(C, L)``).

    ``S_c = Σ x_c`` and ``Q_c = Σ x_c²`` over this rank's slice. For a convolution,
    ``∂S_c/∂W[c]`` is the sum of the input patches of channel c's group — the same
    for every output channel of a group, hence stored once per group, ``G`` rows —
    and ``∂Q_c/∂W[c] = Σ 2 x_c · patch``: two weight gradients of the convolution,
    with ``grad_output`` = ones (one channel per group) and = ``2x``.
    """
    channels = weight_shape[0]
    length = math.prod(weight_shape[1:])
    inp = link.input.detach().to(dtype)
    xs = x.detach().to(dtype)
    if inp.numel() == 0 or xs.numel() == 0:  # a shape fact: this rank's slice is empty
        groups = link.groups if link.kind == "conv" else 1
        return xs.new_zeros(groups, length), xs.new_zeros(channels, length)
    if link.kind == "linear":
        return inp.sum(0, keepdim=True), (2 * xs).t().mm(inp)
    groups = link.groups
    spatial = xs.shape[2:]

    def weight_grad(grad_out: Tensor, shape: Tuple[int, ...], g: int) -> Tensor:
        placeholder = grad_out.new_empty(1).expand(shape)
        return torch.ops.aten.convolution_backward(
            grad_out, inp, placeholder, None, list(link.stride), list(link.padding),
            list(link.dilation), False, [0] * len(spatial), g, (False, True, False))[1]

    ones = xs.new_ones((xs.shape[0], groups) + tuple(spatial))
    d_sum = weight_grad(ones, (groups,) + tuple(weight_shape[1:]), groups)
    d_sq = weight_grad(2 * xs, tuple(weight_shape), groups)
    return d_sum.reshape(groups, length), d_sq.reshape(channels, length)
