"""The one DP-SGD step: Poisson sampling, per-sample clipping, Gaussian noise, the update.

What the guarantee (:mod:`zoo.privacy`) assumes of each step, and what :class:`DPStep` does:
  1. Poisson sampling: each of the ``n`` training samples joins the logical batch independently with probability
     ``q`` (the batch size varies; it may be empty).
  2. The logical batch is processed in physical batches (memory only: the result does not depend on them). Each
     sample comes as ``views`` augmented views; its gradient is the mean over its views, computed exactly per
     sample (:mod:`zoo.dp.grad_sample`).
  3. Each sample's whole gradient is clipped to L2 norm ``clip_norm``; the clipped gradients are summed (over
     every process too, :mod:`zoo.dp.distributed`).
  4. Gaussian noise N(0, (sigma * clip_norm)^2) is added once, the sum is divided by the public constant
     ``expected_batch``, the gradient of any data-free penalty is added (the expected L0 of sparse models,
     :mod:`zoo.nn.sparse`), and the optimizer steps.
Randomness comes from generators seeded per step and stream from ``seed``: the guarantee assumes the seed stays
secret. This module knows no data set, card or task: the caller turns indices into batches and may pass the
task's score.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch

from zoo.dp import distributed
from zoo.dp.grad_sample import NonFiniteGradientError, PerSampleGradients, per_sample_norms
from zoo.nn.sparse import penalty_gradients
from zoo.nn.sparse import penalty_weight as l0_penalty_weight

Score = Callable[[torch.Tensor, torch.Tensor], float]
"""``score(outputs, targets)``: the sum over a batch's samples of a per-sample quality (a progress statistic)."""


def clip_per_sample(grads: dict[str, torch.Tensor], clip_norm: float,
                    norms: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale each sample's whole gradient (all parameters together) to L2 norm at most ``clip_norm``.

    Returns ``(sum over samples of the clipped gradients, per-sample norms before clipping)``. ``norms``: those
    norms when already computed from these very ``grads`` (``PerSampleGradients.norms``), else computed here.
    """
    norms = per_sample_norms(grads) if norms is None else norms
    if not bool(torch.isfinite(norms).all()):  # finite entries whose float32 norm overflows (entries near 1e19)
        raise NonFiniteGradientError(f"{int((~torch.isfinite(norms)).sum())} per-sample gradient norm(s) overflow "
                                     "float32; no update was applied. Normalise the data or lower the learning rate")
    factor = (clip_norm / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("i,i...->...", factor.to(g.dtype), g) for n, g in grads.items()}, norms


def add_noise(summed: dict[str, torch.Tensor], std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Add i.i.d. N(0, std^2) to every coordinate (``std = sigma * clip_norm``); ``std = 0`` adds nothing."""
    if std == 0:
        return summed
    return {n: s + std * torch.randn(s.shape, generator=generator, device=s.device, dtype=s.dtype)
            for n, s in summed.items()}


def dp_gradients(psg: PerSampleGradients, batches, *, clip_norm: float, sigma: float, expected_batch: float,
                 views: int, noise_generator: torch.Generator, score: Score | None = None,
                 penalty_weight: float = 0.0) -> tuple[dict[str, torch.Tensor], float, float]:
    """The gradient of one DP-SGD step (steps 2-4 of the module docstring): ``{name: grad}``, summed loss, and the
    summed ``score(outputs, targets)`` (the task's training statistic, e.g. correct predictions; 0 without
    ``score``). The loss and the score are computed from the private batch without noise: they are not covered by
    the guarantee, and zoo shows them only in the local progress bar (never in a checkpoint or result).

    ``batches`` yields the physical batches ``(x, y)`` of the logical batch, each sample as ``views``
    consecutive views (none for an empty batch). Each sample's gradient (mean over its views) is clipped to
    ``clip_norm``; the sum gets N(0, (sigma * clip_norm)^2) noise and is divided by ``expected_batch``. Then the
    gradient of the model's data-free penalty, ``penalty_weight`` times the expected cost of its open L0 gates
    (:mod:`zoo.nn.sparse`; :class:`DPStep` passes ``l0_lambda / N``), is added: it reads no data, so it needs
    neither clipping nor noise.
    """
    summed = {name: torch.zeros_like(p) for name, p in psg.params.items()}
    loss_sum, correct = 0.0, 0.0
    for x, y in batches:
        grads, losses, outputs = psg(x, y, views=views)  # the model task's per-sample loss
        # the norms the finite check of this call computed, when the gradient computer keeps them
        clipped, _ = clip_per_sample(grads, clip_norm, getattr(psg, "norms", None))
        for name in summed:
            summed[name] += clipped[name]
        loss_sum += losses.sum().item() / views
        if score is not None:
            correct += score(outputs, y) / views
    stats = torch.tensor([loss_sum, correct], dtype=torch.float64, device=next(iter(summed.values())).device)
    distributed.all_reduce_sum({**summed, "stats": stats})  # multi-process: the sum over every rank's samples
    loss_sum, correct = stats.tolist()
    noisy = add_noise(summed, sigma * clip_norm, noise_generator)  # once, after the sum (zoo.dp.distributed)
    out = {name: noisy[name] / expected_batch for name in summed}
    names = {p: name for name, p in psg.params.items()}
    for p, g in penalty_gradients(psg.model, penalty_weight).items():
        out[names[p]] = out[names[p]] + g
    return out, loss_sum, correct


def step_generator(seed: int, step: int, stream: str, device: torch.device) -> torch.Generator:
    """The generator of one random stream (``"sample"``, ``"augment"``, ``"noise"``, ``"model"``, ...) at step ``step``:
    seeded from sha256(seed/stream/step), so streams and steps are independent and any step can be replayed."""
    digest = hashlib.sha256(f"{seed}/{stream}/{step}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def poisson_batch(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson-sampled batch (as opacus' ``UniformWithReplacementSampler``)."""
    return (torch.rand(n, generator=generator, device=generator.device) < sample_rate).nonzero().flatten().cpu()


class DPStep:
    """One DP-SGD step (steps 1-4 of the module docstring), the only code in zoo that releases a gradient: training
    (:func:`zoo.training.engine.train`, :func:`~zoo.training.engine.finetune`), the privacy audit (``eval/audit_privacy.py``) and the step benchmark
    (``eval/bench_dp_step.py``) all call it, so the audit certifies the step that trains the releases.

    Fixed for a run: the gradient computer ``psg`` (:class:`~zoo.dp.grad_sample.PerSampleGradients` or a wrapper of
    it), the optimizer over ``psg.params``, the data set size ``n``, the sampling rate ``q``, ``sigma``, the clip
    norm, the divisor ``expected_batch`` (``q * n`` in training), the ``views`` per sample, the secret ``seed`` and
    the device, and the ``score`` of the training statistic (the task's). Calling it for step ``t`` with ``batches_for(idx, augment_generator)``, which turns the sampled
    indices into that step's physical batches ``(x, y)`` (each sample as ``views`` consecutive views):

    1. draws the Poisson batch ``idx`` from the step's "sample" stream;
    2. computes the clipped, summed, noised gradient (:func:`dp_gradients`; noise from the step's "noise" stream,
       model-internal randomness such as L0 gate draws from its "model" stream);
    3. sets it as the parameters' ``.grad`` and takes the optimizer step.

    Returns ``(idx, released gradient {name: tensor}, summed loss, summed score)``. The privacy accounting of the
    step (``ledger.record(sigma, q)``) is the caller's, as are the EMA and the learning-rate schedule
    (post-processing of released gradients). The guarantee assumes the seed stays secret.
    """

    def __init__(self, psg, optimizer: torch.optim.Optimizer, *, n: int, sample_rate: float, sigma: float,
                 clip_norm: float, expected_batch: float, views: int, seed: int, device: torch.device,
                 score: Score | None = None):
        self.psg, self.optimizer, self.score = psg, optimizer, score
        self.n, self.q, self.sigma, self.clip_norm = n, sample_rate, sigma, clip_norm
        self.expected_batch, self.views, self.seed, self.device = expected_batch, views, seed, torch.device(device)

    def sample(self, step: int) -> torch.Tensor:
        """Step ``step``'s Poisson batch: indices into the ``n`` training samples."""
        return poisson_batch(self.n, self.q, step_generator(self.seed, step, "sample", self.device))

    def __call__(self, step: int, batches_for) -> tuple[torch.Tensor, dict[str, torch.Tensor], float, float]:
        idx = self.sample(step)
        batches = batches_for(idx, step_generator(self.seed, step, "augment", self.device))
        # randomness inside the model (L0 gate draws) comes from torch's global RNG, seeded per step
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(step_generator(self.seed, step, "model", torch.device("cpu")).initial_seed())
            grads, loss_sum, score = dp_gradients(
                self.psg, batches, clip_norm=self.clip_norm, sigma=self.sigma, expected_batch=self.expected_batch,
                views=self.views, noise_generator=step_generator(self.seed, step, "noise", self.device),
                score=self.score, penalty_weight=l0_penalty_weight(self.psg.model, self.n))
        for name, p in self.psg.params.items():
            p.grad = grads[name]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return idx, grads, loss_sum, score
