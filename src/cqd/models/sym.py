"""Sym-parameter gates: feed the mix c (a point on the K-simplex) into any network at named depths.

SGN (Chang et al., ICCV 2019) conditions its generator on c with SE-style gates at three depths:
features * sigmoid(FC(FC([avgpool(features), ReLU(Linear(c))]))). `SymNet(net, k, gates)` wraps a built-in,
`tv:` or `timm:` model: each gated layer (a module path, as for feature taps) gets a forward hook that
replaces its output by the gated output, so neither the model's code nor its module paths change, and
`SymNet(x, c)` runs the net with c visible to every gate. `sym_net(net, k, layers, sample)` sizes the gates by
probing the layers' outputs.

Our choices where SGN's paper gives none (keys of the methods that use it, e.g. `method.symcqd`):
  form       g = 2 * sigmoid(W2 ReLU(W1 [avgpool(F), ReLU(E c)] + b1) + b2), F * g. W2 and b2 start at 0, so
             every gate starts as exactly 1: a net started from f is f, whatever c (CQD's start from the
             teacher is kept), and a gate can both damp (g -> 0) and boost (g -> 2) a channel.
  embed      width of ReLU(E c) (16); `reduction` the SE bottleneck, W1 to max(C // reduction, 4) (4).
  layers     default: the output of each resolution stage (the last feature map of each spatial size,
             1x1 maps left out): for resnet8 `features.3`, `features.4`, `features` (after the stem's
             stage, after each downsampling, after the residual blocks: SGN's three depths).
  layout     a 4-D output is (B, C, H, W) (torchvision's and timm's convnets), pooled over H, W; a 3-D one
             (B, N, C) tokens (timm's ViTs), pooled over N; a 2-D one (B, C) is gated directly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cqd.errors import ConfigError, CQDError
from cqd.models.taps import FeatureTaps, eval_forward, feature_maps


class SymGate(nn.Module):
    """F * 2 sigmoid(FC(ReLU(FC([pool(F), ReLU(Linear(c))])))): an SE gate that also sees c."""

    def __init__(self, channels: int, k: int, embed: int = 16, reduction: int = 4, channel_dim: int = 1):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.channels, self.channel_dim = channels, channel_dim
        self.embed = nn.Linear(k, embed)
        self.fc1 = nn.Linear(channels + embed, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, f: Tensor, c: Tensor) -> Tensor:
        if f.dim() == 4:
            s, shape = f.mean((2, 3)), (f.shape[0], -1, 1, 1)
        elif f.dim() == 3:
            s, shape = f.mean(1), (f.shape[0], 1, -1)
        elif f.dim() == 2:
            s, shape = f, (f.shape[0], -1)
        else:
            raise CQDError(f"a sym gate takes (B, C, H, W), (B, N, C) or (B, C) features, got shape {tuple(f.shape)}")
        e = F.relu(self.embed(c.to(s.dtype)))
        g = 2 * torch.sigmoid(self.fc2(F.relu(self.fc1(torch.cat([s, e], 1)))))
        return f * g.view(shape).to(f.dtype)


class _Context:
    """The c of the forward pass in progress, shared by a SymNet and its gates (not a module: no state)."""

    c: Tensor | None = None


class _GateHook:
    """A forward hook that replaces a layer's output by its gated output. An object, not a closure, so a
    deepcopy of the SymNet copies it along with (and pointing at) the copied gate and context."""

    def __init__(self, gate: SymGate, ctx: _Context, name: str):
        self.gate, self.ctx, self.name = gate, ctx, name

    def __call__(self, module, args, output):
        if self.ctx.c is None:
            raise CQDError(f"layer {self.name!r} is gated by the sym-parameter c, and no c was given: call the "
                           "network as model(x, c), with c a (B, K) batch of mixes on the simplex")
        return self.gate(output, self.ctx.c)


class SymNet(nn.Module):
    """`net` with a sym gate after each layer of `gates` (path -> [channels, channel dim]); call it as (x, c).

    The gates sit in forward hooks, so `net`'s module paths and state_dict keys do not change (`net.*`, and
    `gates.<i>.*` in the order of `gates`). `sym_spec` (k, gates, embed, reduction) rebuilds the same network
    around a fresh `net`: `model.pt` keeps it.
    """

    def __init__(self, net: nn.Module, k: int, gates: dict[str, list[int]], embed: int = 16, reduction: int = 4):
        super().__init__()
        if k < 1:
            raise ConfigError(f"a sym-parameter network needs K >= 1 mix components, got {k}")
        if not gates:
            raise ConfigError("a sym-parameter network needs at least one gated layer")
        self.k, self.sym_spec = k, {"k": k, "gates": {n: list(v) for n, v in gates.items()}, "embed": embed,
                                    "reduction": reduction}
        self._ctx = _Context()
        modules = dict(net.named_modules())
        self.net = net
        self.gates = nn.ModuleList()
        self.gated = list(gates)
        for name, (channels, dim) in gates.items():
            if name not in modules or not name:
                raise _no_layer(net, name)
            gate = SymGate(channels, k, embed, reduction, dim)
            self.gates.append(gate)
            modules[name].register_forward_hook(_GateHook(gate, self._ctx, name))
        for attr in ("num_classes", "in_chans", "model_name"):
            if hasattr(net, attr):
                setattr(self, attr, getattr(net, attr))

    def gate_of(self) -> dict[str, SymGate]:
        """Gated layer path -> its gate."""
        return dict(zip(self.gated, self.gates))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        if c is None or c.dim() != 2 or c.shape != (x.shape[0], self.k):
            got = None if c is None else tuple(c.shape)
            raise CQDError(f"this network is conditioned on a mix of K={self.k} degradations: call it as "
                           f"model(x, c) with c of shape ({x.shape[0]}, {self.k}), got {got}")
        self._ctx.c = c
        try:
            return self.net(x)
        finally:
            self._ctx.c = None


class AtMix(nn.Module):
    """A SymNet with its mix fixed: `AtMix(net, c)(x)` is `net(x, c)` with the one c (K weights) for every
    image of the batch, so code that calls a network with one input (an evaluation, a figure) can use it."""

    def __init__(self, net: SymNet, c):
        super().__init__()
        self.net = net
        c = torch.as_tensor(c, dtype=torch.float32, device=next(net.parameters()).device).view(1, -1)
        self.register_buffer("c", c, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x, self.c.expand(x.shape[0], -1))


def _no_layer(net: nn.Module, name: str) -> ConfigError:
    from cqd.models.taps import unknown_layer

    return unknown_layer(net, name, "a sym gate")


@torch.no_grad()
def stage_outputs(net: nn.Module, sample: Tensor) -> list[str]:
    """The default gated layers: the output of each resolution stage, in forward order. A stage output is a
    layer's 4-D map (larger than 1x1) that another layer takes in and returns at another spatial size (the
    map just before each downsampling), and the last such map of the net; each is named by the shallowest
    module path that outputs it."""
    # (name, input, output)
    seen = [(n, i, t) for n, _, i, t in feature_maps(net, sample) if t.shape[-1] * t.shape[-2] > 1]
    if not seen:
        raise ConfigError(f"{type(net).__name__} gives no 4-D feature map larger than 1x1 on a "
                          f"{tuple(sample.shape[-2:])} input; name the gated layers explicitly (e.g. "
                          "method.symcqd.layers=[blocks.3, blocks.7])")
    outputs = [t for _, _, t in seen]
    before_downsampling = {id(i) for _, i, t in seen if i is not None and i.dim() == 4 and i.shape[-2:] != t.shape[-2:]}
    stages = [t for t in outputs if id(t) in before_downsampling] + [outputs[-1]]
    out: list[str] = []
    for t in stages:
        name = min((n for n, _, s in seen if s is t), key=lambda n: n.count("."))
        if name not in out:
            out.append(name)
    return out


def sym_net(net: nn.Module, k: int, layers: list[str] | None, sample: Tensor, embed: int = 16,
            reduction: int = 4) -> SymNet:
    """`net` gated at `layers` (default: `stage_outputs`), the gates sized by the layers' outputs on `sample`."""
    layers = list(layers) if layers else stage_outputs(net, sample)
    taps = FeatureTaps(net, layers, "a sym gate")
    try:
        eval_forward(net, sample)
    finally:
        taps.remove()
    gates = {}
    for name in layers:
        out = taps.out.get(name)
        if not isinstance(out, Tensor) or out.dim() not in (2, 3, 4):
            raise ConfigError(f"layer {name!r} gives {type(out).__name__} "
                              f"{tuple(out.shape) if isinstance(out, Tensor) else ''}; a sym gate takes a "
                              "(B, C, H, W), (B, N, C) or (B, C) tensor")
        gates[name] = [int(out.shape[1] if out.dim() in (2, 4) else out.shape[-1]), 1 if out.dim() in (2, 4) else -1]
    return SymNet(net, k, gates, embed, reduction)
