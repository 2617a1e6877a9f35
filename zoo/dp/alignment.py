"""Gradient self-alignment (Bani-Harouni et al., MICCAI 2023 workshop) as an option of the DP engine.

Why it can help: a DP-SGD step releases ``u_t = (sum_i clip_C(h_i) + N(0, sigma^2 C^2 I)) / B``. The noise does
not depend on the per-sample gradients, while the signal ``||sum_i clip_C(h_i)||`` is at most ``B * C`` and
reaches it only when the clipped gradients point the same way. Bani-Harouni et al. raise the cosine similarity
between each sample's DP-processed gradient and its non-DP counterpart, and report that aligning only a relevant
subset of the gradient's coordinates works better. Their code is not public; this is the formulation zoo uses.

**Formulation.** Sample i's *non-DP gradient* is ``g_i(theta) = grad L_i(theta)``, where ``L_i`` is the mean task
loss over its K augmented views. Its *DP-processed gradient* is what DP-SGD releases and applies, the noisy
clipped mean. The current step's release is unknown while ``g_i`` is computed; using it would also make i's
contribution depend on the other samples and on this step's noise. Its public estimate is therefore the
reference ``r_t``, an EMA of the updates already released:

    r_t = beta * r_{t-1} + (1 - beta) * u_{t-1},   r_0 = 0,   beta = REFERENCE_DECAY.

Each sample minimises its self-aligned loss and contributes the clipped gradient of it:

    L~_i(theta) = L_i(theta) + lambda * (1 - cos(m * g_i(theta), m * r_t))
    contribution_i = clip_C(grad L~_i(theta_t))

This gradient is exact and per sample. The cosine's gradient is a per-sample Hessian-vector product
``H_i v_i``, computed with ``torch.func`` (``vmap`` over samples of ``grad`` of ``grad``).

**Variants** (recipe ``align``):

* ``"off"``: plain DP-SGD.
* ``"all"``: ``m = 1``; every coordinate is aligned.
* ``"subset"``: ``m = 1`` on the ``ceil(f * P)`` coordinates (of all P trainable coordinates together) with the
  largest ``|r_t|``, ``f = align_fraction``; ties go to the lower index.

The subset is where the released updates have moved the model most. That is where the public signal lies, and a
per-sample gradient that agrees with it there survives the averaging. ``lambda = align_weight``. While
``r_t = 0`` (the first step) the term is absent.

**Privacy argument.** ``grad L~_i(theta_t)`` is a function of sample i only (its views, drawn from a generator
that reads no data), of ``theta_t``, and of ``r_t`` and ``m_t``. ``theta_t``, ``r_t`` and ``m_t`` are functions of
the public initialisation and of the released ``u_1 .. u_{t-1}``, so using them is post-processing. Hence each
clipped contribution has norm at most C, and adding or removing one sample changes the sum by at most C (the
add/remove sensitivity of plain DP-SGD). Each step is the same subsampled Gaussian mechanism, chosen from
earlier outputs only, so the accountant's adaptive composition holds unchanged. ``tests/test_alignment.py``
checks the sensitivity bound, and that a sample's contribution is the same alone as inside any batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from zoo.dp.grad_sample import LossFn, check_finite_gradients, prepare_batch
from zoo.dp.validate import validate_model

ALIGN_MODES = ("off", "all", "subset")
DEFAULT_WEIGHT = 1.0    # lambda, when the recipe leaves align_weight unset
DEFAULT_FRACTION = 0.1  # f of the "subset" rule, when the recipe leaves align_fraction unset
REFERENCE_DECAY = 0.9   # beta of the reference EMA
REFERENCE_SLOT = "align_reference"  # optimizer-state slot holding r_t (saved and restored with checkpoints)


@dataclass(frozen=True)
class AlignSettings:
    mode: str = "off"
    weight: float = DEFAULT_WEIGHT
    fraction: float = DEFAULT_FRACTION

    @classmethod
    def from_recipe(cls, recipe: dict) -> "AlignSettings":
        """The settings a recipe asks for (``align``, ``align_weight``, ``align_fraction``; unset: defaults)."""
        mode = recipe.get("align") or "off"
        weight = DEFAULT_WEIGHT if recipe.get("align_weight") is None else float(recipe["align_weight"])
        fraction = DEFAULT_FRACTION if recipe.get("align_fraction") is None else float(recipe["align_fraction"])
        if mode not in ALIGN_MODES:
            raise ValueError(f"align must be one of {ALIGN_MODES}, got {mode!r}")
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"align_weight must be a finite number >= 0, got {weight}")
        if not 0 < fraction <= 1:
            raise ValueError(f"align_fraction must be in (0, 1], got {fraction}")
        return cls(mode, weight, fraction)


def subset_masks(reference: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Boolean masks selecting the ``ceil(fraction * P)`` coordinates of largest ``|reference|`` over all
    parameters together (ties: lower index in the concatenation of the parameters in order)."""
    flat = torch.cat([r.detach().flatten().abs() for r in reference.values()])
    k = max(1, math.ceil(fraction * flat.numel()))
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[order] = True
    return dict(zip(reference, chosen.split([r.numel() for r in reference.values()])))


def update_reference(state: dict, params: dict[str, nn.Parameter], released: dict[str, torch.Tensor]) -> None:
    """``r <- beta r + (1 - beta) u`` in ``state[p][REFERENCE_SLOT]`` (an optimizer's state), from the released
    (noisy) update ``u`` only."""
    for name, p in params.items():
        slot = state[p]
        ref = slot.get(REFERENCE_SLOT)
        if ref is None:
            ref = slot[REFERENCE_SLOT] = torch.zeros_like(p, memory_format=torch.preserve_format)
        ref.mul_(REFERENCE_DECAY).add_(released[name].detach(), alpha=1 - REFERENCE_DECAY)


class AlignedPerSampleGradients:
    """Per-sample gradients of the self-aligned loss (module docstring), with the interface of
    :class:`zoo.dp.grad_sample.PerSampleGradients`: ``psg(x, y, views=K) -> ({name: [B, *shape]}, losses, outputs)``.

    Call :meth:`set_reference` with the public reference before each step. With no reference, or a zero one, the
    result is the plain per-sample gradient of ``L_i``. Computed with ``torch.func`` on the unhooked model.
    """

    def __init__(self, model: nn.Module, settings: AlignSettings):
        if settings.mode == "off":
            raise ValueError("alignment is off: use zoo.dp.grad_sample.PerSampleGradients")
        self.model = validate_model(model)
        self.settings = settings
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._ref: dict[str, torch.Tensor] | None = None
        self._mask: dict[str, torch.Tensor] | None = None
        self.norms: torch.Tensor | None = None  # the last call's per-sample gradient norms (clipping reuses them)

    def set_reference(self, reference: dict[str, torch.Tensor | None] | None) -> None:
        """Use ``reference`` (``{name: r}``, public) for the next calls; ``None`` or all-zero: no alignment term."""
        if reference is None or any(r is None for r in reference.values()):
            self._ref = self._mask = None
            return
        masks = subset_masks(reference, self.settings.fraction) if self.settings.mode == "subset" else None
        ref = {n: (r * masks[n].view_as(r) if masks else r).detach() for n, r in reference.items()}
        norm = torch.sqrt(sum((r.double() ** 2).sum() for r in ref.values()))
        if norm == 0:
            self._ref = self._mask = None
            return
        self._ref = {n: r / norm.to(r.dtype) for n, r in ref.items()}  # unit vector m * r / ||m * r||
        self._mask = {n: m.view_as(reference[n]) for n, m in masks.items()} if masks else None

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn | None = None,
                 views: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        loss_fn, b, empty = prepare_batch(self.model, self.params, inputs, targets, loss_fn, views)
        self.norms = None
        if empty is not None:
            return empty
        x = inputs.reshape(b, views, *inputs.shape[1:])
        y = targets.reshape(b, views, *targets.shape[1:])
        params = {n: p.detach() for n, p in self.params.items()}
        model, ref, mask, weight = self.model, self._ref, self._mask, self.settings.weight

        def sample_loss(p, xi, yi):
            out = functional_call(model, p, (xi,))
            losses = loss_fn(out, yi)
            return losses.mean(), (losses, out)

        def alignment_term(p, xi, yi):
            g, aux = grad(sample_loss, has_aux=True)(p, xi, yi)
            gm = {n: g[n] * mask[n] for n in g} if mask is not None else g
            dot = sum((gm[n] * ref[n]).sum() for n in gm)
            norm = torch.sqrt(sum((gm[n] ** 2).sum() for n in gm) + 1e-30)
            return weight * (1 - dot / norm), (g, *aux)

        def aligned(p, xi, yi):
            d_term, (g, losses, out) = grad(alignment_term, has_aux=True)(p, xi, yi)
            return {n: g[n] + d_term[n] for n in g}, (losses, out)

        fn = aligned if ref is not None else grad(sample_loss, has_aux=True)
        grads, (losses, outputs) = vmap(fn, in_dims=(None, 0, 0), randomness="different")(params, x, y)
        grads = {n: g.detach() for n, g in grads.items()}
        self.norms = check_finite_gradients(grads, losses.detach().reshape(b, views).mean(1))  # before clipping
        return grads, losses.detach().reshape(-1), outputs.detach().reshape(b * views, *outputs.shape[2:])

    def close(self) -> None:
        """Nothing to remove (no hooks); present for the interface of ``PerSampleGradients``."""
