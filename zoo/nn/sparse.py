"""L0 sparsity under DP: hard-concrete gates (Louizos, Welling, Kingma 2018) and pruning into smaller networks.

A :class:`HardConcreteGate` multiplies each channel ``c`` of its input by a gate ``z_c`` in [0, 1]:

* training: ``u ~ U(0, 1)`` drawn per sample and channel, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
  ``z = min(1, max(0, s (zeta - gamma) + gamma))``;
* eval: the deterministic ``z = min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma))``;
* penalty: Louizos et al.'s ``(lambda / N) sum_g |g| P(z_g != 0)``, with ``P(z_g != 0) = sigmoid(log_alpha_g - beta
  log(-gamma / zeta))``, ``|g|`` the number of parameters a closed gate removes (its ``cost``) and ``N`` the training
  set size: ``lambda`` is a price per parameter, against the mean loss of one sample (their code,
  AMLab-Amsterdam/L0_regularization: ``-(1/N) sum layer.regularization()``, each gate's column summed over its
  weights). A flat price per gate, independent of N, charges every gate alike and closes them together;

with ``beta = 2/3``, ``gamma = -0.1``, ``zeta = 1.1`` and ``log_alpha`` initialised from a drop rate of 0.3.

Gate scale ``k`` (``HardConcreteGate(..., scale=k)``): DP-SGD trains ``theta = log_alpha / k`` instead of
``log_alpha``. The parameter stored and read everywhere stays ``log_alpha``; what changes is the coordinate in which
its gradient is clipped and noised: a sample's gradient is ``k`` times that of ``log_alpha`` (the grad sampler and
the penalty multiply by ``k``), and the optimizer steps ``log_alpha`` with ``k`` times the learning rate
(:func:`optimizer_groups`), which is SGD on ``theta`` exactly (momentum and EMA are linear). Why: under DP a gate's
clipped data gradient sits far below the noise per coordinate (``eval/l0_gate_signal.py``: 38x for wrn16-4-l0 on
CIFAR-10), so with ``k = 1`` the gates either do not move or close as the penalty orders them; ``k`` gives the gates
``k`` times their share of the clipping budget while the noise per coordinate stays ``sigma C / B``: the
signal-to-noise ratio of the gates grows by ``k``, their effective learning rate and the penalty's pull by ``k^2``.
The privacy argument is unchanged: one clipped vector per sample, noised as a whole.

Under DP: a sample's gradient of ``log_alpha`` flows through its own gate draw and its own activations, so it is
computed exactly per sample (registered grad sampler) and clipped and noised with every other parameter. The
penalty depends on no data: its gradient is added after the noise (:func:`penalty_gradients`), which costs no
privacy. The gate noise is drawn from torch's global RNG, which the engine seeds per step.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1


def _stretched(s: torch.Tensor) -> torch.Tensor:
    """``s (zeta - gamma) + gamma``: the gate before clamping to [0, 1]."""
    return s * (ZETA - GAMMA) + GAMMA


class HardConcreteGate(nn.Module):
    """One hard-concrete gate per channel of a ``[B, C, H, W]`` (or ``[B, C]``) input; ``channels=1`` gates the
    whole input at once (a whole residual branch). Args: channels, drop_rate (initial probability of a closed
    gate, sets ``log_alpha``), cost (parameters that one closed gate removes from the pruned network: its weight in
    the penalty, Louizos et al.'s group size ``|g|``), scale (the gate scale ``k`` of the module docstring: DP-SGD
    trains ``log_alpha / k``)."""

    def __init__(self, channels: int, drop_rate: float = 0.3, cost: float = 1.0, scale: float = 1.0):
        super().__init__()
        if not 0.0 < drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in (0, 1), got {drop_rate}")
        if not cost > 0:
            raise ValueError(f"cost must be > 0 (parameters one closed gate removes), got {cost}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0 (DP-SGD trains log_alpha / scale; 1: log_alpha itself), got {scale}")
        self.cost, self.scale = float(cost), float(scale)
        self.log_alpha = nn.Parameter(torch.full((channels,), math.log(1 - drop_rate) - math.log(drop_rate)))
        self._s: torch.Tensor | None = None  # the stretched sigmoid of the last forward, for the grad sampler

    def _sample_s(self, n: int) -> torch.Tensor:
        la = self.log_alpha.unsqueeze(0)
        if not self.training:
            return torch.sigmoid(la).expand(n, -1)
        u = torch.rand(n, la.shape[1], device=la.device, dtype=la.dtype).clamp(1e-6, 1 - 1e-6)
        return torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / BETA)

    def gates(self, n: int = 1) -> torch.Tensor:
        """``[n, C]`` gate values: random draws in training, the deterministic test-time gates in eval."""
        return _stretched(self._sample_s(n)).clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self._sample_s(x.shape[0])
        self._s = s.detach()
        z = _stretched(s).clamp(0.0, 1.0)
        return x * z.view(*z.shape, *([1] * (x.dim() - 2)))

    def expected_l0(self) -> torch.Tensor:
        """Expected number of open gates, ``sum sigmoid(log_alpha - beta log(-gamma / zeta))``: data-free."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA)).sum()

    def expected_cost(self) -> torch.Tensor:
        """Expected number of parameters the open gates keep, ``cost * expected_l0()``: data-free."""
        return self.cost * self.expected_l0()

    def extra_repr(self) -> str:
        return f"channels={self.log_alpha.numel()}, cost={self.cost:g}" + (f", scale={self.scale:g}"
                                                                           if self.scale != 1 else "")


@register_grad_sampler(HardConcreteGate)
def hard_concrete_grad_sample(layer: HardConcreteGate, activations: list[torch.Tensor], backprops: torch.Tensor):
    """Exact per-sample gradient of ``log_alpha``: ``sum_hw(g * x) * dz/dlog_alpha`` with the sample's own draw,
    ``dz/dlog_alpha = (zeta - gamma) s (1 - s) / beta`` where the gate is not clamped (opacus computes per-sample
    gradients in training mode only, where the gates are random); times the gate's ``scale``: the gradient with
    respect to ``theta = log_alpha / scale``, the coordinate DP-SGD clips and noises."""
    x = activations[0].to(backprops.dtype)
    if not layer.log_alpha.requires_grad:
        return {}
    s = layer._s
    if s is None or s.shape[0] != x.shape[0]:
        raise RuntimeError("HardConcreteGate: the gate draw of this batch is missing; run forward and backward "
                           "of one batch before the next forward")
    s = s.to(backprops.dtype)
    z_lin = _stretched(s)
    dz = (ZETA - GAMMA) * s * (1 - s) / BETA * ((z_lin > 0) & (z_lin < 1))
    gx = (backprops * x).reshape(x.shape[0], layer.log_alpha.numel(), -1).sum(-1)  # one gate may cover all channels
    return {layer.log_alpha: gx * dz * layer.scale}


def gate_modules(model: nn.Module) -> list[HardConcreteGate]:
    return [m for m in model.modules() if isinstance(m, HardConcreteGate)]


def expected_l0(model: nn.Module) -> torch.Tensor:
    """Sum of the expected L0 norms of every gate of ``model`` (0 if it has none)."""
    gates = gate_modules(model)
    return torch.stack([g.expected_l0() for g in gates]).sum() if gates else torch.zeros(())


def expected_cost(model: nn.Module) -> torch.Tensor:
    """Expected number of gated parameters kept, ``sum_g |g| P(z_g != 0)`` over every gate of ``model``."""
    gates = gate_modules(model)
    return torch.stack([g.expected_cost() for g in gates]).sum() if gates else torch.zeros(())


def penalty_weight(model: nn.Module, num_samples: int) -> float:
    """The weight of :func:`expected_cost` in one step's gradient: ``model.l0_lambda / N`` (Louizos et al.'s
    ``lambda / N``; 0 for a model without ``l0_lambda``)."""
    return float(getattr(model, "l0_lambda", 0.0)) / num_samples


def penalty_gradients(model: nn.Module, weight: float) -> dict[nn.Parameter, torch.Tensor]:
    """Gradients of ``weight * expected_cost(model)`` w.r.t. the gates' ``theta = log_alpha / scale`` (``scale``
    times those w.r.t. ``log_alpha``; ``weight`` from :func:`penalty_weight`): data-free, so the DP step adds them to
    the noisy gradient without clipping or noise."""
    gates = gate_modules(model)
    if not gates or weight == 0:
        return {}
    params = [g.log_alpha for g in gates]
    with torch.enable_grad():
        grads = torch.autograd.grad(weight * expected_cost(model), params)
    return {p: g * gate.scale for p, g, gate in zip(params, grads, gates)}


def optimizer_groups(model: nn.Module) -> list[dict]:
    """Parameter groups for ``torch.optim.SGD``: every parameter at the base learning rate, and the ``log_alpha`` of
    gates with a scale ``k != 1`` at ``k`` times it (key ``lr_scale``: whoever sets the lr, e.g. a schedule, multiplies
    by it), so that stepping ``log_alpha`` is SGD on ``theta = log_alpha / k``. One group when no gate is scaled."""
    scaled: dict[float, list[nn.Parameter]] = {}
    for g in gate_modules(model):
        if g.scale != 1.0:
            scaled.setdefault(g.scale, []).append(g.log_alpha)
    ids = {id(p) for ps in scaled.values() for p in ps}
    return [{"params": [p for p in model.parameters() if id(p) not in ids], "lr_scale": 1.0},
            *({"params": ps, "lr_scale": k} for k, ps in scaled.items())]


# ----------------------------------------------------------------------------- pruning
_PRUNERS: dict[type, Callable[[nn.Module], tuple[nn.Module, list[dict], dict]]] = {}


def register_pruner(cls: type):
    """Register ``fn(model) -> (smaller model, channels kept per gate, args)`` for a model class (exact type, as
    opacus' grad samplers); ``args`` are the family arguments (apart from ``num_classes`` and ``in_chans``) that
    build the smaller model without gates, so that a checkpoint of it loads by its sidecar alone. ``fn`` runs in
    eval mode without autograd."""
    def wrap(fn):
        _PRUNERS[cls] = fn
        return fn
    return wrap


def count_flops(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Floating-point operations of one eval forward pass on one input of ``input_size`` (torch's counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_size, device=p.device, dtype=p.dtype))
    model.train(was)
    return counter.get_total_flops()


def prune(model: nn.Module, input_size: tuple[int, ...] | None = None) -> tuple[nn.Module, dict]:
    """A physically smaller dense copy of a gated model, with the same eval outputs, and a report.

    Channels whose test-time gate is 0 are removed (with the weights that read or write them); gates in (0, 1]
    are folded into the neighbouring affine. It reads the weights alone, no data: pruning a DP-trained model is
    post-processing and costs no privacy. ``model`` is left unchanged. The smaller model is of the same family,
    without gates. The report has ``params`` and ``flops`` before and after, the channels kept per gate and
    ``args``: the family arguments that build the smaller model (e.g. a WideResNet's ``mid_channels``).
    ``input_size`` (default: ``(in_chans, 32, 32)``) is the per-sample input for the FLOP count.
    """
    fn = _PRUNERS.get(type(model))
    if fn is None:
        raise TypeError(f"no pruner registered for {type(model).__name__}; prunable: "
                        f"{sorted(c.__name__ for c in _PRUNERS)} (register one with zoo.nn.sparse.register_pruner)")
    if not gate_modules(model):
        raise ValueError(f"{type(model).__name__} has no L0 gates to prune by; build a sparse variant such as "
                         "'wrn16-4-l0' (or pass l0=True)")
    size = tuple(input_size or (model.in_chans, 32, 32))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            small, kept, args = fn(model)
    finally:
        model.train(was)
    small.eval()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    report = {"params_before": count(model), "params_after": count(small),
              "flops_before": count_flops(model, size), "flops_after": count_flops(small, size), "kept": kept,
              "args": dict(args)}
    return small, report
