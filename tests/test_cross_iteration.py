"""CrossIterationBatchNorm (docs/algorithms.md §4) against an independent float64 reference.

The reference below is written from the text of §4 with plain differentiable torch
ops: the derivatives ∂μ/∂W, ∂ν/∂W (and ∂/∂b) come from ``torch.autograd.grad`` of the
channel means of the producer's output, not from the layer's weight-gradient
shortcut; the window, the max(ν, μ²) guard, burn-in and the running statistics are
spelled out; gradients flow through the current iteration's μ_t, ν_t only because
past values are stored detached.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import distnorm
from distnorm import CrossIterationBatchNorm

ITERATIONS = 6
LR = 0.2


# -- the reference ---------------------------------------------------------------------
class RefCBN:
    """§4 in plain float64 torch ops, for one BN layer fed by ``producer``."""

    def __init__(self, bn: CrossIterationBatchNorm, producer: nn.Module | None) -> None:
        self.window, self.burn_in, self.rho = bn.window, bn.burn_in, bn.rho
        self.eps, self.momentum = bn.eps, bn.momentum
        self.gamma = bn.weight.detach().clone().double().requires_grad_()
        self.beta = bn.bias.detach().clone().double().requires_grad_()
        self.running_mean = bn.running_mean.clone().double()
        self.running_var = bn.running_var.clone().double()
        self.producer = producer
        self.history: list = []
        self.step = 0

    def params(self):
        return [self.gamma, self.beta]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, x.dim()))
        count = x.numel() // x.shape[1]
        mu = x.mean(dims)
        nu = (x * x).mean(dims)
        in_burn_in = self.step < self.burn_in
        self.step += 1
        mus, nus = [mu], [torch.maximum(nu, mu * mu)]
        if self.window > 1 and not in_burn_in:
            prod = self.producer
            weight = prod.weight.detach() if prod is not None else None
            bias = prod.bias.detach() if prod is not None and prod.bias is not None else None
            for past in self.history:
                m, n = past["mu"], past["nu"]
                if prod is not None and self.rho != 0:
                    dw = weight - past["w"]
                    dm = (past["dmu_dw"] * dw).flatten(1).sum(1)
                    dn = (past["dnu_dw"] * dw).flatten(1).sum(1)
                    if bias is not None:
                        db = bias - past["b"]
                        dm = dm + past["dmu_db"] * db
                        dn = dn + past["dnu_db"] * db
                    m, n = m + self.rho * dm, n + self.rho * dn
                mus.append(m)
                nus.append(torch.maximum(n, m * m))
            # record this iteration
            entry = {"mu": mu.detach().clone(), "nu": nu.detach().clone()}
            if prod is not None:
                leaves = [prod.weight] + ([prod.bias] if prod.bias is not None else [])
                g_mu = torch.autograd.grad(mu.sum(), leaves, retain_graph=True)
                g_nu = torch.autograd.grad(nu.sum(), leaves, retain_graph=True)
                entry.update(dmu_dw=g_mu[0], dnu_dw=g_nu[0], w=weight.clone())
                if bias is not None:
                    entry.update(dmu_db=g_mu[1], dnu_db=g_nu[1], b=bias.clone())
            self.history = (self.history + [entry])[-(self.window - 1):]
        mean = torch.stack(mus).mean(0)
        var = torch.stack(nus).mean(0) - mean * mean
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        y = y * self.gamma.view(shape) + self.beta.view(shape)
        with torch.no_grad():
            var_t = nu - mu * mu
            self.running_mean.lerp_(mu, self.momentum)
            self.running_var.lerp_(var_t * count / (count - 1), self.momentum)
        return y


# -- the nets ----------------------------------------------------------------------------
PRODUCERS = {
    "plain": dict(cin=3, kernel_size=3),
    "stride_pad": dict(cin=3, kernel_size=3, stride=2, padding=1),
    "groups": dict(cin=4, kernel_size=3, padding=1, groups=2),
    "depthwise": dict(cin=4, kernel_size=3, padding=1, groups=4),
    "dilation": dict(cin=3, kernel_size=3, padding=2, dilation=2),
    "no_bias": dict(cin=3, kernel_size=3, padding=1, bias=False),
    "reflect": dict(cin=3, kernel_size=3, padding=1, padding_mode="reflect"),
    "same": dict(cin=3, kernel_size=4, padding="same"),  # asymmetric zero padding
}
C = 4


def _build(producer: str, seed: int = 0, dims: int = 2, **options):
    """conv→CBN→ReLU→conv→CBN (or linear→CBN→ReLU→linear→CBN), float64."""
    torch.manual_seed(seed)
    if producer == "linear":
        first, second = nn.Linear(5, C), nn.Linear(C, C, bias=False)
    else:
        spec = dict(PRODUCERS[producer])
        cin = spec.pop("cin")
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        first, second = conv(cin, C, **spec), conv(C, C, 3, padding=1)
    bn1, bn2 = CrossIterationBatchNorm(C, **options), CrossIterationBatchNorm(C, **options)
    for bn in (bn1, bn2):
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return nn.Sequential(first, bn1, nn.ReLU(), second, bn2).double()


def _input_shape(producer: str, n: int, dims: int = 2):
    if producer == "linear":
        return (n, 5)
    return (n, PRODUCERS[producer]["cin"]) + (6,) * dims


def _batches(producer: str, sizes, seed: int = 1, dims: int = 2):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(_input_shape(producer, n, dims), generator=gen, dtype=torch.float64) * 2 + 1
        out.append(x)
    return out


def _reference_model(net: nn.Sequential, use_producers: bool = True):
    """Float64 copies of the producers and a RefCBN per BN layer."""
    first, second = copy.deepcopy(net[0]), copy.deepcopy(net[3])
    ref1 = RefCBN(net[1], first if use_producers else None)
    ref2 = RefCBN(net[4], second if use_producers else None)

    def forward(x):
        return ref2(second(F.relu(ref1(first(x)))))

    params = list(first.parameters()) + ref1.params() + list(second.parameters()) + ref2.params()
    return forward, params, (ref1, ref2)


def _net_params(net):
    return [net[0].weight] + ([net[0].bias] if net[0].bias is not None else []) + [
        net[1].weight, net[1].bias, net[3].weight] + (
        [net[3].bias] if net[3].bias is not None else []) + [net[4].weight, net[4].bias]


def _sgd(params):
    with torch.no_grad():
        for p in params:
            p -= LR * p.grad
            p.grad = None


def _loss_weights(shape, it):
    gen = torch.Generator().manual_seed(100 + it)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _compare_runs(producer, batches, dims=2, use_producers=True, **options):
    net = _build(producer, dims=dims, **options)
    forward, ref_params, refs = _reference_model(net, use_producers)
    for it, x in enumerate(batches):
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        y = net(xa)
        y_ref = forward(xb)
        r = _loss_weights(y.shape, it)
        (y * r).sum().backward()
        (y_ref * r).sum().backward()
        torch.testing.assert_close(y, y_ref, msg=lambda m: f"iteration {it}: output: {m}")
        torch.testing.assert_close(xa.grad, xb.grad, msg=lambda m: f"iteration {it}: input grad: {m}")
        for p, q in zip(_net_params(net), ref_params):
            torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"iteration {it}: grad: {m}")
        for bn, ref in zip((net[1], net[4]), refs):
            torch.testing.assert_close(bn.running_mean, ref.running_mean)
            torch.testing.assert_close(bn.running_var, ref.running_var)
        _sgd(_net_params(net))
        _sgd(ref_params)
    return net


# -- local parity ----------------------------------------------------------------------
@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("rho", [0.0, 1.0])
def test_matches_reference_window_rho(window, rho):
    _compare_runs("plain", _batches("plain", [2, 3, 1, 2, 4, 2, 3, 2]), window=window, rho=rho)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("producer", sorted(PRODUCERS) + ["linear"])
def test_matches_reference_producers(producer):
    net = _compare_runs(producer, _batches(producer, [2, 3, 2, 4, 2, 3]), window=3, rho=1.0)
    assert net[1].history_bytes() > 0


@pytest.mark.parametrize("dims", [1, 3])
def test_matches_reference_1d_3d(dims):
    _compare_runs("stride_pad", _batches("stride_pad", [2, 3, 2, 1, 2, 3], dims=dims), dims=dims,
                  window=3)


def test_matches_reference_burn_in():
    _compare_runs("plain", _batches("plain", [2, 3, 1, 2, 4, 2, 3]), window=4, burn_in=3)


def test_window_one_is_batch_norm_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, C, 3), CrossIterationBatchNorm(C, window=1), nn.ReLU(),
                        nn.Conv2d(C, C, 3), CrossIterationBatchNorm(C, window=1))
    ref = copy.deepcopy(net)
    ref[1], ref[4] = distnorm.revert_model(copy.deepcopy(net[1])), distnorm.revert_model(
        copy.deepcopy(net[4]))
    assert type(ref[1]) is nn.BatchNorm2d
    for it in range(4):
        x = torch.randn(2, 3, 8, 8)
        y, y_ref = net(x), ref(x)
        assert torch.equal(y, y_ref)
        y.square().sum().backward()
        y_ref.square().sum().backward()
        for p, q in zip(net.parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad)
        for m in (net, ref):
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
    assert torch.equal(net[4].running_var, ref[4].running_var)


def test_burn_in_iterations_are_batch_norm_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, C, 3), CrossIterationBatchNorm(C, window=4, burn_in=3))
    ref = nn.Sequential(copy.deepcopy(net[0]), distnorm.revert_model(copy.deepcopy(net[1])))
    for it in range(5):
        x = torch.randn(2, 3, 8, 8)
        y, y_ref = net(x), ref(x)
        if it < 3:
            assert torch.equal(y, y_ref), it
            assert net[1]._recorded == 0 and net[1]._hist_dsq is None  # nothing recorded
        elif it == 3:  # the first recorded iteration: a window of itself alone
            torch.testing.assert_close(y, y_ref)
        else:
            assert not torch.allclose(y, y_ref)
        for m, out in ((net, y), (ref, y_ref)):
            out.square().sum().backward()
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
        if it < 4:  # running statistics from the current iteration, as BatchNorm
            torch.testing.assert_close(net[1].running_mean, ref[1].running_mean)
            torch.testing.assert_close(net[1].running_var, ref[1].running_var)


def test_no_producer_warns_once_and_uses_rho_zero():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, C, 3).double()
    bn = CrossIterationBatchNorm(C, window=3).double()
    bn._distnorm_name = "head.bn"
    naive = CrossIterationBatchNorm(C, window=3, rho=0.0).double()
    naive.load_state_dict(bn.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for it in range(4):
            x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
            h = F.relu(conv(x))  # not straight from the conv
            torch.testing.assert_close(bn(h), naive(h.detach().clone().requires_grad_()))
            with torch.no_grad():
                conv.weight.add_(0.1)
    messages = [str(w.message) for w in caught if "head.bn" in str(w.message)]
    assert len(messages) == 1 and "head.bn" in messages[0]


def test_attach_explicit_and_errors():
    conv = nn.Conv2d(3, C, 3)
    bn = CrossIterationBatchNorm(C, window=2)
    assert bn.attach(conv) is bn and bn.producer is conv
    assert "producer" not in dict(bn.named_modules()) and not any(
        "weight" in k and k != "weight" for k in bn.state_dict())
    assert set(bn.state_dict()) == set(nn.BatchNorm2d(C).state_dict())
    with pytest.raises(ValueError, match="output channels"):
        bn.attach(nn.Conv2d(3, C + 1, 3))
    with pytest.raises(TypeError, match="Conv"):
        bn.attach(nn.ReLU())
    with pytest.raises(ValueError, match="window"):
        CrossIterationBatchNorm(C, window=0)
    x = torch.randn(2, 3, 6, 6)
    bn(conv(x)).sum().backward()
    other = nn.Conv2d(3, C, 3)
    with pytest.raises(RuntimeError, match="different layer"):
        bn(other(x))
    with pytest.raises(RuntimeError, match="not the output"):
        bn(conv(x) + 1)
    # a producer whose weight changes shape between iterations
    lin = nn.Linear(3, C)
    bn = CrossIterationBatchNorm(C, window=3).attach(lin)
    bn(lin(torch.randn(4, 3)))
    lin.weight = nn.Parameter(torch.randn(C, 5))
    with pytest.raises(ValueError, match="changed shape"):
        bn(lin(torch.randn(4, 5)))


def test_history_dtype_bytes_and_resume():
    x_all = _batches("plain", [2, 3, 2, 2, 3, 2])
    net = _build("plain", window=4)
    for it, x in enumerate(x_all[:3]):
        (net(x) * _loss_weights((x.shape[0], C, 4, 4), it)).sum().backward()
        _sgd(_net_params(net))
    saved = {"model": copy.deepcopy(net.state_dict()),
             "history": [net[1].history_state(), net[4].history_state()]}
    resumed = _build("plain", seed=5, window=4)
    resumed.load_state_dict(saved["model"])
    resumed[1].load_history_state(saved["history"][0])
    resumed[4].load_history_state(saved["history"][1])
    for it, x in enumerate(x_all[3:], start=3):
        ya, yb = net(x), resumed(x)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
        for m, y in ((net, ya), (resumed, yb)):
            (y * _loss_weights(y.shape, it)).sum().backward()
            _sgd(_net_params(m))
    # storage in bfloat16 halves (or better) the derivative history
    full = _build("plain", window=4)
    half = _build("plain", window=4, history_dtype=torch.bfloat16)
    for m in (full, half):
        for x in x_all[:2]:
            m(x).sum().backward()
    assert half[4]._hist_dsq.dtype == torch.bfloat16
    assert half[4].history_bytes() < full[4].history_bytes()
    weight_bytes = full[4]._hist_dsq[0].numel() * 8
    assert full[4]._hist_dsq.numel() * 8 == 3 * weight_bytes  # k - 1 copies of the weight


# -- synced parity -----------------------------------------------------------------------
SHARDS = {
    2: [[1, 2], [3, 0], [2, 2], [0, 3], [1, 1], [2, 1], [3, 1]],
    3: [[1, 0, 2], [2, 1, 1], [0, 0, 3], [1, 2, 0], [2, 2, 1], [1, 1, 1]],
}


def _synced_worker(rank, world, producer, batches, shard_sizes, options):
    net = _build(producer, **options)
    results = []
    for it, (x, sizes) in enumerate(zip(batches, shard_sizes)):
        start = sum(sizes[:rank])
        xs = x[start:start + sizes[rank]].clone().requires_grad_()
        y = net(xs)
        r = _loss_weights((x.shape[0],) + tuple(y.shape[1:]), it)[start:start + sizes[rank]]
        (y * r).sum().backward()
        grads = [p.grad.clone() for p in _net_params(net)]
        for p in _net_params(net):  # the global loss is the sum over ranks
            dist.all_reduce(p.grad)
        _sgd(_net_params(net))
        results.append({"y": y.detach(), "gx": xs.grad, "grads": grads,
                        "rm": net[4].running_mean.clone(), "rv": net[4].running_var.clone(),
                        "rv1": net[1].running_var.clone()})
    return results


def _reference_steps(producer, batches, options):
    net = _build(producer, **options)
    forward, params, refs = _reference_model(net)
    steps = []
    for it, x in enumerate(batches):
        x = x.clone().requires_grad_()
        y = forward(x)
        (y * _loss_weights(y.shape, it)).sum().backward()
        steps.append({"y": y.detach(), "gx": x.grad, "grads": [p.grad.clone() for p in params],
                      "rm": refs[1].running_mean.clone(), "rv": refs[1].running_var.clone(),
                      "rv1": refs[0].running_var.clone()})
        _sgd(params)
    return steps


@pytest.mark.parametrize("world_size,producer,options", [
    (2, "plain", dict(window=3)),
    (3, "plain", dict(window=8)),
    (3, "depthwise", dict(window=4, burn_in=2)),
    (2, "linear", dict(window=3, rho=1.0)),
])
def test_synced_matches_concatenated_reference(request, world_size, producer, options):
    pool = request.getfixturevalue(f"world{world_size}")
    shard_sizes = SHARDS[world_size]
    batches = _batches(producer, [sum(s) for s in shard_sizes])
    out = pool.run(_synced_worker, producer, batches, shard_sizes, options)
    ref = _reference_steps(producer, batches, options)
    for it, expected in enumerate(ref):
        got = [out[r][it] for r in range(world_size)]
        torch.testing.assert_close(torch.cat([g["y"] for g in got]), expected["y"],
                                   msg=lambda m: f"iteration {it}: output: {m}")
        torch.testing.assert_close(torch.cat([g["gx"] for g in got]), expected["gx"],
                                   msg=lambda m: f"iteration {it}: input grad: {m}")
        for i, q in enumerate(expected["grads"]):
            torch.testing.assert_close(sum(g["grads"][i] for g in got), q,
                                       msg=lambda m: f"iteration {it}: param {i}: {m}")
        for key in ("rm", "rv", "rv1"):
            for g in got:
                torch.testing.assert_close(g[key], expected[key])


def _empty_group_worker(rank, world):
    torch.manual_seed(0)  # the same weights on every rank, as under DDP
    conv = nn.Conv2d(3, C, 3)
    torch.manual_seed(10 + rank)  # different data
    bn = CrossIterationBatchNorm(C, window=3)
    xs, outs = [], []
    for n in (2, 0, 1):  # the middle iteration is empty on every rank
        x = torch.randn(n, 3, 5, 5)
        y = bn(conv(x))
        y.sum().backward()
        xs.append(x)
        outs.append(y.detach())
    return {"conv": conv.state_dict(), "counts": bn._hist_count.clone(), "x": xs, "y": outs,
            "tracked": bn.num_batches_tracked.clone()}


def test_synced_empty_group_iteration_is_left_out(world2):
    out = world2.run(_empty_group_worker)
    conv = nn.Conv2d(3, C, 3)
    conv.load_state_dict(out[0]["conv"])
    bn = CrossIterationBatchNorm(C, window=3)
    for it in (0, 2):  # the same window without the empty iteration
        y = bn(conv(torch.cat([o["x"][it] for o in out])))
    torch.testing.assert_close(torch.cat([o["y"][2] for o in out]), y.detach())
    for o in out:
        assert sorted(o["counts"].tolist()) == [0.0, 2 * 9.0]
        assert int(o["tracked"]) == 2
# -- conversion ---------------------------------------------------------------------------
def test_convert_resnet18_finds_every_producer():
    torchvision = pytest.importorskip("torchvision")
    model = distnorm.convert_model(torchvision.models.resnet18(num_classes=10), mode="cbn",
                                   window=2)
    layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm)]
    assert len(layers) == 20
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no producer" warning
        for _ in range(2):
            loss = model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert all(m._producer is not None and not m._no_producer for m in layers)
    assert all(m.history_bytes() > 0 for m in layers)
    assert set(model.state_dict()) == set(torchvision.models.resnet18(num_classes=10).state_dict())


class _DetectionNeck(nn.Module):
    """torchvision's FPN (conv→BN in every block) and SSDLite head (depthwise and
    pointwise conv→BN per level) on a toy multi-level feature map."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.detection.ssdlite import SSDLiteHead
        from torchvision.ops import FeaturePyramidNetwork

        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fpn = FeaturePyramidNetwork([8, 16], 8, norm_layer=nn.BatchNorm2d)
        self.head = SSDLiteHead([8, 8], [2, 2], 3, norm_layer=nn.BatchNorm2d)

    def forward(self, x):
        c1 = self.stem(x)
        c2 = self.down(c1)
        features = list(self.fpn({"c1": c1, "c2": c2}).values())
        out = self.head(features)
        return out["bbox_regression"].sum() + out["cls_logits"].logsumexp(-1).sum()


def test_convert_detection_neck_finds_every_producer():
    pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = distnorm.convert_model(_DetectionNeck(), mode="cbn", window=3)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CrossIterationBatchNorm)}
    assert len(layers) == 10  # stem, down, 2 FPN inner + 2 layer blocks, 2 × 2 head levels
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            model(torch.randn(2, 3, 32, 32)).backward()
            opt.step()
            opt.zero_grad()
    missing = [n for n, m in layers.items() if m._producer is None or m._no_producer]
    assert not missing
    assert all(torch.isfinite(m.running_var).all() for m in layers.values())


@pytest.mark.slow
def test_convert_torchvision_ssdlite_trains():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3)
    model = distnorm.convert_model(model, mode="cbn", window=2).train()
    layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm)]
    images = [torch.rand(3, 96, 96) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1])}
               for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = sum(model(images, targets).values())
        loss.backward()
    assert layers and all(m._producer is not None and not m._no_producer for m in layers)
