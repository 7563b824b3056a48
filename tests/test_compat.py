"""distnorm._compat: the private torch APIs distnorm reads still read as it expects.

A torch release that renames one of them fails here, by name, before it shows up
as a cross-iteration layer that silently loses its producer.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from torch import nn

from distnorm import _compat


def test_convolution_node_exposes_its_saved_arguments():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2)
    x = torch.randn(2, 4, 8, 8)
    node = conv(x).grad_fn
    assert _compat.node_name(node) == "ConvolutionBackward0"
    assert tuple(_compat.saved_argument(node, "stride")) == (2, 2)
    assert tuple(_compat.saved_argument(node, "padding")) == (1, 1)
    assert tuple(_compat.saved_argument(node, "dilation")) == (1, 1)
    assert int(_compat.saved_argument(node, "groups")) == 2
    assert _compat.saved_argument(node, "transposed") is False
    assert not any(_compat.saved_argument(node, "output_padding"))
    assert torch.equal(_compat.saved_argument(node, "weight"), conv.weight)
    # the input needs no gradient, yet autograd saves it for the weight's
    assert torch.equal(_compat.saved_argument(node, "input"), x)
    assert _compat.accumulated_leaf(node.next_functions[1][0]) is conv.weight
    assert _compat.accumulated_leaf(node.next_functions[2][0]) is conv.bias
    assert _compat.saved_argument(node, "no_such_argument") is None
    assert _compat.accumulated_leaf(node) is None


def test_linear_nodes_expose_their_saved_arguments():
    lin = nn.Linear(3, 5)
    x = torch.randn(4, 3, requires_grad=True)  # mat2 (the weight) is saved for x's gradient
    node = lin(x).grad_fn
    assert _compat.node_name(node) == "AddmmBackward0"
    assert _compat.saved_argument(node, "alpha") == 1 and _compat.saved_argument(node, "beta") == 1
    assert torch.equal(_compat.saved_argument(node, "mat1"), x)
    assert torch.equal(_compat.saved_argument(node, "mat2").t(), lin.weight)
    assert _compat.node_name(node.next_functions[2][0]) == "TBackward0"
    assert _compat.accumulated_leaf(node.next_functions[0][0]) is lin.bias
    node = nn.Linear(3, 5, bias=False)(x).grad_fn
    assert _compat.node_name(node) == "MmBackward0"
    assert torch.equal(_compat.saved_argument(node, "self"), x)
    assert _compat.saved_argument(nn.Linear(3, 5)(x.detach()).grad_fn, "mat2") is None


def test_dynamo_switch_and_functional_collectives():
    assert _compat.dynamo_disabled() is (bool(torch._dynamo.config.disable)
                                         or os.environ.get("TORCHDYNAMO_DISABLE") == "1")
    funcol = _compat.functional_collectives()
    assert callable(funcol.all_reduce) and callable(funcol.wait_tensor)
    code = ("import torch; from distnorm import _compat; "
            "print(_compat.dynamo_disabled(), torch.compile(lambda: torch._dynamo.is_compiling())())")
    for variable in ("TORCH_COMPILE_DISABLE", "TORCHDYNAMO_DISABLE"):
        env = {k: v for k, v in os.environ.items()
               if k not in ("TORCH_COMPILE_DISABLE", "TORCHDYNAMO_DISABLE")}
        env[variable] = "1"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120, check=True)
        # torch.compile runs the plain function under either switch, and we say so
        assert out.stdout.split() == ["True", "False"], (variable, out.stdout, out.stderr)


def test_group_names_from_sets_and_restores_torch_counter():
    import torch.distributed.distributed_c10d as c10d

    from distnorm._compat import group_names_from

    before = c10d._world.group_count
    with group_names_from(before + 12345):
        assert c10d._world.group_count == before + 12345
    assert c10d._world.group_count == before
