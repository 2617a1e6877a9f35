"""Exact per-sample gradients: the contract every zoo model meets.

``per_sample_gradients(model, x, y)[name][i]`` is the gradient of ``loss_fn(model(x_i), y_i)`` for sample i
alone. Computed with opacus' grad-sampler hooks (one registered sampler per layer type; zoo's own layers register
theirs beside them: :mod:`zoo.nn.layers`, :mod:`zoo.nn.equivariant`, :mod:`zoo.nn.sparse`), so it is exact, not an
approximation, and it raises when any trainable parameter did not receive a per-sample gradient (that parameter
would otherwise be updated without clipping: a privacy bug).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample import grad_sample_module as _opacus_gsm
from torch import nn

from zoo.dp.objectives import objective_of, per_sample_cross_entropy
from zoo.dp.validate import DPCompatibilityError, validate_model

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class MissingPerSampleGradientError(DPCompatibilityError):
    """A trainable parameter received no per-sample gradient (it would be updated without clipping)."""


class NonFiniteGradientError(FloatingPointError, ValueError):
    """A sample's gradient has a NaN or Inf entry. Clipping cannot bound it (its norm is not a number), so a DP
    step applying it would write NaN into the weights: the step must stop before the optimizer runs. A
    ``ValueError`` too (bad input or diverged weights), so the command line reports it like other bad input."""


def per_sample_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """The L2 norm ``[B]`` of each sample's whole gradient (all parameters together), what clipping bounds."""
    return torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)


def check_finite_gradients(grads: dict[str, torch.Tensor], losses: torch.Tensor | None = None) -> torch.Tensor | None:
    """Raise :class:`NonFiniteGradientError` if any per-sample gradient ``{name: [B, *shape]}`` has a NaN or Inf
    entry, naming the samples (batch positions), the parameters and the samples' losses; otherwise return the
    per-sample norms (:func:`per_sample_norms`; None for no parameters), which clipping reuses.

    Called where per-sample gradients are produced (:class:`PerSampleGradients`), so that training stops before
    the optimizer step: the weights, and every checkpoint written so far, keep their last finite values. A finite
    input can still overflow inside the model (float32 overflows above about 3.4e38; a squared activation of
    1e20 already does), so a finite input does not imply a finite gradient. One pass over the gradients computes
    the norms; a NaN or Inf entry makes its sample's norm NaN or Inf, so only then are the entries read again to
    say where. Finite entries whose norm overflows are returned (an inf norm): :func:`zoo.dp.step.clip_per_sample`
    refuses them.
    """
    if not grads:
        return None
    norms = per_sample_norms(grads)
    if bool(torch.isfinite(norms).all()):  # one device sync per batch, whatever the number of parameters
        return norms
    finite = {name: torch.isfinite(g).reshape(len(g), -1).all(1) for name, g in grads.items()}  # [B] each
    ok = torch.stack(list(finite.values())).all(0)
    if bool(ok.all()):
        return norms
    bad_params = [name for name, f in finite.items() if not bool(f.all())]
    bad_samples = ~ok
    idx = bad_samples.nonzero().flatten().tolist()
    shown = ", ".join(map(str, idx[:8])) + (f" and {len(idx) - 8} more" if len(idx) > 8 else "")
    loss = "" if losses is None else f" (their losses: {[round(v, 4) for v in losses.flatten()[idx[:8]].tolist()]})"
    raise NonFiniteGradientError(
        f"the per-sample gradients of {len(idx)} of {len(bad_samples)} samples, at batch positions {shown}{loss}, "
        f"have NaN or Inf entries in {len(bad_params)} parameter(s), e.g. {bad_params[:3]}; clipping cannot bound "
        "them, so no update was applied. Check those inputs for extreme values (a finite input can overflow inside "
        "the model: normalise the data), or, if the weights have diverged, lower the learning rate and resume from "
        "the last checkpoint.")


def prepare_batch(model: nn.Module, params: dict[str, nn.Parameter], inputs: torch.Tensor, targets: torch.Tensor,
                  loss_fn: LossFn | None, views: int):
    """Checks shared by the per-sample gradient computers: ``(loss_fn, samples B, result for an empty batch or
    None)``. The default loss is the model task's (:mod:`zoo.dp.objectives`); then ``targets`` are checked like the
    inputs (shape, channels, dtype, finite values, labels or masks in range: the objective's ``check``); with a
    custom ``loss_fn`` only the inputs' values are checked here (the model's forward checks their shape and dtype).
    ``views`` must be a positive int dividing the batch. Errors are ``TypeError``/``ValueError`` saying what to
    change."""
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"views must be a positive int (augmented views per sample), got {views!r}")
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f"inputs and targets must be torch.Tensors, got {type(inputs).__name__} and "
                        f"{type(targets).__name__}; convert with torch.as_tensor")
    if loss_fn is None and hasattr(model, "num_classes"):
        objective = objective_of(model)
        objective.check(inputs, targets, model.num_classes, model.in_chans)
        loss_fn = objective.loss
    elif not torch.isfinite(inputs).all():
        raise ValueError("inputs contain NaN or Inf values; clean or re-normalise the data")
    total = inputs.shape[0]
    if total % views:
        raise ValueError(f"batch of {total} inputs is not a whole number of samples with {views} views each")
    b = total // views
    empty = None
    if b == 0:  # an empty Poisson batch: nothing to differentiate
        empty = ({n: p.new_zeros((0, *p.shape)) for n, p in params.items()}, inputs.new_zeros(0), inputs.new_zeros(0))
    return loss_fn or per_sample_cross_entropy, b, empty


class _StoringGradSampleModule(GradSampleModule):
    """opacus' ``GradSampleModule`` (its hooks, strict checks and registered grad samplers), storing each layer's
    per-sample gradients as the grad sampler returns them.

    opacus (1.5, 1.6) stores them by allocating a zero-filled ``[batch, *param.shape]`` buffer and copying the
    sampler's result into it (``create_or_accumulate_grad_sample``), so that a parameter used several times in one
    forward pass (tied weights, RNN steps) can accumulate into it. A parameter used once per pass (every layer of
    a zoo model) has nothing to accumulate, so the fill and the copy only double the memory traffic of the
    per-sample gradients: 13-16 % of a ScatterNet + CNN step on 2 CPU cores (``torch.profiler``, one
    256-sample batch).
    Here such a parameter (forward counter 1, no partial sum, a full batch) adopts the sampler's tensor; every
    other case goes through opacus' own function. The values are the same bit for bit
    (``tests/test_grad_sample.py`` checks this against opacus' ``GradSampleModule``)."""

    def capture_backprops_hook(self, module, _forward_input, forward_output, loss_reduction, batch_first):
        if not self.hooks_enabled:
            return
        activations, backprops = self.rearrange_grad_samples(
            module=module, backprops=forward_output[0].detach(), loss_reduction=loss_reduction, batch_first=batch_first)
        kind = self._get_module_type(module) if hasattr(self, "_get_module_type") else type(module)
        sampler = (self.GRAD_SAMPLERS[kind] if not self.force_functorch and kind in self.GRAD_SAMPLERS
                   else _opacus_gsm.ft_compute_per_sample_gradient)
        for param, gs in sampler(module, activations, backprops).items():
            if not param.requires_grad:
                continue
            if (param._forward_counter == 1 and not hasattr(param, "_current_grad_sample")
                    and gs.shape[0] == module.max_batch_len):
                param._current_grad_sample = gs  # used once in this pass: nothing to accumulate into
            else:
                _opacus_gsm.create_or_accumulate_grad_sample(param=param, grad_sample=gs,
                                                             max_batch_len=module.max_batch_len)
        for _, p in _opacus_gsm.trainable_parameters(module):  # opacus' end-of-pass bookkeeping, unchanged
            p._forward_counter -= 1
            if p._forward_counter == 0:
                _opacus_gsm.promote_current_grad_sample(p)
            if not self.grad_accumulation_allowed and isinstance(p.grad_sample, list) and len(p.grad_sample) > 1:
                raise ValueError("Poisson sampling is not compatible with grad accumulation: call optimizer.step() "
                                 "after every forward/backward pass")
        if len(module.activations) == 0 and hasattr(module, "max_batch_len"):
            del module.max_batch_len


class PerSampleGradients:
    """Computes per-sample gradients of a model; wraps it once with opacus' hooks (``close()`` removes them).

    The model is validated first (:func:`zoo.dp.validate.validate_model`). ``views`` > 1 means the batch holds
    ``views`` consecutive augmented views of each sample (``[x_0^1..x_0^K, x_1^1, ...]``) and the returned
    gradient of sample i is the mean over its views (augmentation multiplicity, De et al. 2022).
    """

    def __init__(self, model: nn.Module):
        self.model = validate_model(model)
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.wrapped = _StoringGradSampleModule(model, batch_first=True, loss_reduction="sum")  # opacus strict checks
        self.norms: torch.Tensor | None = None  # the last call's per-sample gradient norms [B] (clipping reuses them)
        # the raw outputs of the layers that own trainable parameters, collected during the forward pass: the
        # backward pass differentiates with respect to them (see __call__). Registered after opacus' hooks, so
        # they see the output before the full backward hook wraps it
        self._anchors: list[torch.Tensor] = []
        self._handles = [m.register_forward_hook(self._keep_output) for m in model.modules()
                         if any(p.requires_grad for p in m.parameters(recurse=False))]

    def _keep_output(self, module: nn.Module, args, output) -> None:
        outs = output if isinstance(output, (tuple, list)) else (output,)
        self._anchors.extend(o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn | None = None,
                 views: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Return ``({name: [B, *shape]}, per-view losses [B * views], outputs)`` with ``B = len(inputs) // views``.

        Raises :class:`NonFiniteGradientError` when a sample's gradient has a NaN or Inf entry (nothing is
        returned that an optimizer could apply); bad batches (:func:`prepare_batch`) raise before the forward pass.

        The default loss is the per-sample loss of the model's task (:mod:`zoo.dp.objectives`: cross-entropy for
        classifiers, Dice + cross-entropy per sample for segmenters); then ``targets`` are checked like the
        inputs."""
        loss_fn, b, empty = prepare_batch(self.model, self.params, inputs, targets, loss_fn, views)
        self.norms = None
        if empty is not None:
            return empty
        total = inputs.shape[0]
        for p in self.params.values():
            p.grad_sample = None
        # differentiate w.r.t. the trainable layers' outputs only: every layer's hook still gets its backprops,
        # and autograd computes neither the aggregated weight gradients (DP-SGD never uses them) nor the gradient
        # of the first trainable layer's input (the data, or a fixed front end's output: for a ScatterNet + CNN,
        # a 243-channel input whose gradient was 14 % of the step)
        self._anchors.clear()
        try:
            outputs = self.wrapped(inputs.detach())
            losses = loss_fn(outputs, targets)
            if losses.shape != (total,):
                raise ValueError(f"loss_fn must return one loss per sample (shape [{total}]), got "
                                 f"{tuple(losses.shape)}")
            if losses.requires_grad and self._anchors:  # none: no hook can fire, and the check below says which
                with warnings.catch_warnings():  # opacus' full backward hooks warn when inputs need no grad: harmless
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    torch.autograd.grad(losses.sum(), self._anchors, allow_unused=True)
        finally:
            self._anchors.clear()
        grads = {}
        for name, p in self.params.items():
            gs = p.grad_sample
            p.grad_sample, p.grad = None, None
            if gs is None or gs.shape != (total, *p.shape):
                raise MissingPerSampleGradientError(
                    f"parameter {name!r} received no per-sample gradient (got {None if gs is None else tuple(gs.shape)}); "
                    "it would be updated without clipping. Is the layer used through a functional call or a "
                    "module opacus cannot hook?")
            grads[name] = gs.view(b, views, *p.shape).mean(1) if views > 1 else gs
        self.norms = check_finite_gradients(grads, losses.detach().view(b, views).mean(1))
        return grads, losses.detach(), outputs.detach()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self.wrapped._close()


def per_sample_gradients(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                         loss_fn: LossFn | None = None) -> dict[str, torch.Tensor]:
    """``{parameter name: [B, *param.shape]}``; entry i is the gradient of ``loss_fn(model(x_i), y_i)``.

    ``loss_fn(outputs, targets)`` must return per-sample losses of shape ``[B]`` (default: the model's task loss,
    :mod:`zoo.dp.objectives`: cross-entropy, or for segmenters Dice + cross-entropy of each sample's pixels). The
    model's ``.grad`` is left untouched. An empty batch gives ``[0, *param.shape]`` tensors; a bad batch raises
    ``TypeError``/``ValueError`` (:func:`prepare_batch`), a NaN or Inf gradient :class:`NonFiniteGradientError`.
    """
    saved = {n: p.grad for n, p in model.named_parameters()}
    psg = PerSampleGradients(model)
    try:
        return psg(inputs, targets, loss_fn)[0]
    finally:
        psg.close()
        for n, p in model.named_parameters():
            p.grad = saved[n]
