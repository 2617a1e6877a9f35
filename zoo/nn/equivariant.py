"""DP-safe equivariant building blocks on escnn, as tensor-in/tensor-out modules that own their parameters.

opacus' hooks need modules that take and return plain tensors and own their trainable parameters; escnn's
layers take ``GeometricTensor`` and R2Conv keeps its (data-free) basis in buffers. So zoo wraps them:

* :class:`R2Conv` — escnn's R2Conv, group ``G`` acting on the plane (``gspace``), from ``in_type`` to
  ``out_type``. The filter is a *linear* function of the basis coefficients, so a sample's coefficient
  gradient is the transpose of that map applied to its filter gradient (exact; see its grad sampler).
* :class:`FieldGroupNorm` — GroupNorm whose groups are made of whole fields of a permutation representation
  (regular or quotient); statistics per sample; one scale per field and one bias per field along the
  invariant all-ones direction, so the layer is equivariant. :class:`FieldNorm` — the same affine, with
  statistics over each field's channels at each position (escnn's FieldNorm).
* :func:`group_pool` — max over each regular field's |G| channels: invariant features.

escnn is imported lazily (about 2 s) so that ``import zoo`` stays fast.
"""
from __future__ import annotations

import copy
import hashlib
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn

from zoo.nn.layers import conv_filter_grad_sample, empty_grad_sample, largest_divisor


def relocate_escnn_cache() -> Path:
    """Point escnn's on-disk cache (joblib ``Memory`` stores of irrep restrictions and Clebsch-Gordan
    coefficients, by default inside escnn's install directory) at ``$ZOO_CACHE/escnn`` and return it.

    In a read-only install escnn cannot write its own directory: it then warns on every miss and recomputes
    in every process (48 s for a small D12 model on 2 cores). The stores are reconfigured in place, so every
    function escnn decorated with them follows. Idempotent; called whenever zoo builds an escnn gspace.
    """
    import joblib

    from zoo.io import cache_root

    target = cache_root() / "escnn"
    for name, module in list(sys.modules.items()):
        if not name.startswith("escnn") or module is None:
            continue
        for memory in [v for v in vars(module).values() if isinstance(v, joblib.Memory)]:
            backend = memory.store_backend
            if backend is not None and Path(backend.location) != target / "joblib":
                backend.configure(str(target / "joblib"), verbose=0,
                                  backend_options={"compress": backend.compress, "mmap_mode": backend.mmap_mode})
                memory.location = str(target)
    return target


def gspace(group: str):
    """escnn gspace for ``'c4'``, ``'c8'``, ``'d4'``, ``'d8'``, ... (rotations C_N, rotations + flips D_N)."""
    with warnings.catch_warnings():  # py3nj serves 3D groups only; zoo installs escnn without it on purpose
        warnings.filterwarnings("ignore", message="`py3nj` package not found")
        from escnn import gspaces
    relocate_escnn_cache()

    kind, n = group[0].lower(), int(group[1:])
    if kind == "c":
        return gspaces.rot2dOnR2(N=n)
    if kind == "d":
        return gspaces.flipRot2dOnR2(N=n)
    raise ValueError(f"unknown group {group!r}: use cN (rotations) or dN (rotations and reflections), e.g. 'd4'")


def regular_type(gs, fields: int):
    from escnn import nn as enn

    return enn.FieldType(gs, [gs.regular_repr] * fields)


def trivial_type(gs, channels: int):
    from escnn import nn as enn

    return enn.FieldType(gs, [gs.trivial_repr] * channels)


def he_init(weights: torch.Tensor, basis, key: str) -> None:
    """escnn's generalized He initialisation, with its per-coefficient variances cached on disk.

    escnn computes them in a Python loop over every coefficient (about 25 s for a D4 ResNet-9 on 2 cores) and
    caches them per process only. zoo keeps them under ``$ZOO_CACHE/escnn`` (see :func:`zoo.io.cache_root`),
    keyed by escnn's version, the field types and the kernel settings; the random draw is unchanged.
    """
    import escnn
    from escnn.nn import init

    from zoo.io import atomic_write, cache_root, save_npy

    digest = hashlib.sha256(f"{escnn.__about__.__version__}|{key}|{basis.dimension()}".encode()).hexdigest()[:32]
    path = cache_root() / "escnn" / f"he-{digest}.npy"
    if basis not in init.cached_he_vars and path.is_file():
        init.cached_he_vars[basis] = torch.from_numpy(np.load(path, allow_pickle=False))
    init.generalized_he_init(weights, basis, cache=True)
    if not path.is_file():
        atomic_write(path, lambda tmp: save_npy(tmp, init.cached_he_vars[basis].numpy()))
    del init.cached_he_vars[basis]  # keyed by the basis object: would otherwise keep every layer alive


_ESCNN_BASES: dict[str, tuple] = {}


def _escnn_basis(key: str, in_type, out_type, kernel_size, padding, stride, bias, escnn_kwargs):
    """``(basis expansion, bias expansion or None)`` of escnn's R2Conv for these types, built once per process:
    escnn re-walks the whole steerable basis (Clebsch-Gordan lookups in its joblib cache) for every layer it
    builds, which made a cached WRN-40-4-D8 build take about 3 s; the result only depends on the key."""
    if (key, bias) not in _ESCNN_BASES:
        from escnn import nn as enn

        conv = enn.R2Conv(in_type, out_type, kernel_size, padding=padding, stride=stride, bias=bias,
                          initialize=False, **escnn_kwargs)
        _ESCNN_BASES[key, bias] = (conv._basisexpansion, conv.bias_expansion if bias else None)
    return _ESCNN_BASES[key, bias]


_IDENTITY_HASHED: dict[type, type] = {}


def _identity_hashed(cls: type) -> type:
    """``cls`` with ``nn.Module``'s identity hash. escnn's basis modules hash their content, reading tensor data,
    which ``torch.func`` transforms cannot do: ``functional_call`` (used by :mod:`zoo.dp.alignment`) hashes every
    submodule while it walks the model."""
    if cls.__hash__ is nn.Module.__hash__:
        return cls
    if cls not in _IDENTITY_HASHED:
        _IDENTITY_HASHED[cls] = type(cls.__name__, (cls,), {"__hash__": nn.Module.__hash__,
                                                            "__module__": cls.__module__})
    return _IDENTITY_HASHED[cls]


def _copy_buffers(module: nn.Module) -> nn.Module:
    """A copy of a buffers-only module tree with its own tensors; the (read-only) Python attributes, such as
    escnn's basis descriptions, stay shared. Much cheaper than ``copy.deepcopy`` of escnn's basis objects.
    The copies hash by identity, as every ``nn.Module`` does (:func:`_identity_hashed`)."""
    new = copy.copy(module)
    new.__class__ = _identity_hashed(type(module))
    new._buffers = {k: None if v is None else v.clone() for k, v in module._buffers.items()}
    new._modules = {k: None if m is None else _copy_buffers(m) for k, m in module._modules.items()}
    new._parameters = {}
    return new


class R2Conv(nn.Module):
    """Equivariant convolution ``in_type -> out_type`` (escnn's R2Conv) on plain tensors.

    Trainable: ``weights`` (basis coefficients) and optionally ``bias`` (one per invariant output component).
    The expanded filter and the sampled basis are data-free constants of the field types. They are kept outside
    the module tree (``basis``, ``basis_t``, ``bias_expansion`` are plain attributes, moved with the module by
    :meth:`_apply`, absent from the state_dict): a trainable layer then holds no buffers, which is what opacus'
    ``GradSampleModule`` (and so ``PrivacyEngine.make_private``) requires, so an equivariant zoo model works in a
    user's own opacus pipeline as it is.
    """

    def __init__(self, in_type, out_type, kernel_size: int = 3, padding: int = 1, stride: int = 1,
                 bias: bool = False, **escnn_kwargs):
        super().__init__()
        key = f"{in_type}|{out_type}|{kernel_size}|{padding}|{stride}|{sorted(escnn_kwargs.items())}"
        basis, bias_expansion = _escnn_basis(key, in_type, out_type, kernel_size, padding, stride, bias,
                                             escnn_kwargs)
        self.in_type, self.out_type = in_type, out_type
        self.kernel_size, self.stride, self.padding = (kernel_size, kernel_size), (stride, stride), (padding, padding)
        self.dilation = (1, 1)
        # own tensors (.double() or .to() on one layer cannot reach another), outside the module tree
        object.__setattr__(self, "basis", _copy_buffers(basis))
        self.weights = nn.Parameter(torch.zeros(basis.dimension()))
        he_init(self.weights.data, self.basis, key)
        self.bias = None
        self.bias_expansion = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(bias_expansion.shape[1]))
            self.bias_expansion = bias_expansion.clone()
        # the transposed basis for the per-sample projection, when the expansion is one contiguous block
        # (one input and one output representation, as in every zoo model): [o, i*S, d], see coefficient_grads
        basis_t = None
        pairs = self.basis._representations_pairs
        if len(pairs) == 1 and self.basis._contiguous[pairs[0]]:
            sampled = getattr(self.basis, f"block_expansion_{self.basis._escape_pair(pairs[0])}").sampled_basis
            d, o, i = sampled.shape[:3]
            basis_t = sampled.reshape(d, o, -1).permute(1, 2, 0).contiguous()
        self.basis_t = basis_t

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.double()``, ``.cuda()``...: the parameters as usual, and the constants kept outside the
        module tree (the basis module's buffers, ``basis_t``, ``bias_expansion``) alike."""
        super()._apply(fn, recurse)
        self.basis._apply(fn)
        self.basis_t = None if self.basis_t is None else fn(self.basis_t)
        self.bias_expansion = None if self.bias_expansion is None else fn(self.bias_expansion)
        return self

    def expand_filter(self, weights: torch.Tensor) -> torch.Tensor:
        f = self.basis(weights)
        return f.reshape(f.shape[0], f.shape[1], *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias_expansion @ self.bias
        return F.conv2d(x, self.expand_filter(self.weights), bias, self.stride, self.padding, self.dilation)

    def coefficient_grads(self, filter_grads: torch.Tensor) -> torch.Tensor:
        """Pull per-sample filter gradients ``[B, C_out, C_in, k, k]`` back to coefficient gradients ``[B, dim]``.

        The filter is ``F = E(w)`` with ``E`` linear, so ``dL/dw = E^T(dL/dF)``: exact. With one contiguous block
        of ``F_out x F_in`` field pairs of sizes ``o x i`` sharing a basis ``b[d, o, i, S]`` (escnn's layout:
        coefficients ``[F_out, F_in, d]``, filter ``[F_out, o, F_in, i, S]``), it is
        ``g[n, F, G, d] = sum_{o, i, S} dF[n, F, o, G, i, S] b[d, o, i, S]``, done as ``o`` strided batched
        matrix products with no copy of ``dF`` (2-4x faster on CPU than ``vmap`` of escnn's backward, which
        permutes ``dF`` first). Otherwise ``vmap`` over ``torch.func.vjp`` of :meth:`expand_filter`.
        """
        n = filter_grads.shape[0]
        if self.basis_t is None:
            _, vjp = torch.func.vjp(self.expand_filter, self.weights.detach())
            return torch.func.vmap(lambda g: vjp(g)[0])(filter_grads)
        o, j, d = self.basis_t.shape
        fo, fi = self.out_type.size // o, self.in_type.size * math.prod(self.kernel_size) // j
        g = filter_grads.reshape(n * fo, o, fi, j)
        out = torch.bmm(g[:, 0], self.basis_t[0].expand(n * fo, j, d))
        for k in range(1, o):
            out.baddbmm_(g[:, k], self.basis_t[k].expand(n * fo, j, d))
        return out.view(n, -1)


@register_grad_sampler(R2Conv)
def r2conv_grad_sample(layer: R2Conv, activations: list[torch.Tensor], backprops: torch.Tensor):
    """Per-sample coefficient gradients: per-sample filter gradients (opacus' unfold trick) pulled back through
    the linear basis expansion (:meth:`R2Conv.coefficient_grads`). Exact."""
    x = activations[0].to(backprops.dtype)
    if x.shape[0] == 0:
        return empty_grad_sample(layer)
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weights.requires_grad:
        gf = conv_filter_grad_sample(layer, x, backprops, out_channels=layer.out_type.size)
        ret[layer.weights] = layer.coefficient_grads(gf)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum((2, 3)) @ layer.bias_expansion
    return ret


class _FieldNorm(nn.Module):
    """Shared affine of the field normalizations: ``weight[f]`` scales every channel of field f and ``bias[f]``
    is added along its invariant all-ones direction; both commute with a permutation action, so the layer stays
    equivariant. Subclasses define :meth:`normalize` (per sample, never over the batch)."""

    def __init__(self, num_fields: int, field_size: int, affine: bool = True, eps: float = 1e-5):
        super().__init__()
        self.num_fields, self.field_size, self.eps = num_fields, field_size, eps
        self.weight = nn.Parameter(torch.ones(num_fields)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_fields)) if affine else None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.normalize(x)
        if self.weight is None:
            return y
        w = self.weight.repeat_interleave(self.field_size).view(1, -1, 1, 1)
        b = self.bias.repeat_interleave(self.field_size).view(1, -1, 1, 1)
        return y * w + b


class FieldGroupNorm(_FieldNorm):
    """Equivariant GroupNorm for ``num_fields`` permutation fields (regular or quotient) of ``field_size``.

    Averages, per sample, over ``num_groups`` groups made of whole fields and all positions (never over the
    batch): ``F.group_norm`` with groups aligned to field boundaries, so a permutation inside a field or a
    rotation of the plane leaves every group's statistics unchanged. Affine: see :class:`_FieldNorm`.
    """

    def __init__(self, num_fields: int, field_size: int, num_groups: int = 16, affine: bool = True,
                 eps: float = 1e-5):
        super().__init__(num_fields, field_size, affine, eps)
        self.num_groups = largest_divisor(num_fields, num_groups)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, eps=self.eps)  # groups of num_fields/num_groups whole fields


class FieldNorm(_FieldNorm):
    """escnn's FieldNorm for permutation fields (regular or quotient): each field of each sample is normalized
    at each position on its own, over its ``field_size`` channels only (no spatial or batch averaging).

    A transitive permutation representation has one invariant component, the all-ones direction, so the mean
    is the average over the field's channels and the variance the mean square after centring. Unlike escnn
    (which detaches the statistics), gradients flow through them: the layer is differentiated as written.
    Affine: see :class:`_FieldNorm`. Stays a plain-torch module in :func:`export` (no torch layer normalizes
    channel groups per position).
    """

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        v = x.view(b, self.num_fields, self.field_size, h, w)
        var, mean = torch.var_mean(v, dim=2, keepdim=True, unbiased=False)
        return ((v - mean) * torch.rsqrt(var + self.eps)).view(b, c, h, w)


FIELD_NORMS = ("fieldgroupnorm", "fieldnorm")


def field_norm_layer(name: str, num_groups: int = 16, affine: bool = True):
    """Factory ``(num_fields, field_size) -> module`` for an equivariant per-sample normalization:
    ``'fieldgroupnorm'`` (statistics over groups of whole fields and all positions) or ``'fieldnorm'``
    (statistics over each field's channels at each position). Batch normalizations are not offered."""
    key = name.lower()
    if key == "fieldgroupnorm":
        return lambda nf, size: FieldGroupNorm(nf, size, num_groups, affine)
    if key == "fieldnorm":
        return lambda nf, size: FieldNorm(nf, size, affine)
    raise ValueError(f"unknown equivariant normalization {name!r}; zoo offers only per-sample (DP-safe) choices: "
                     f"{list(FIELD_NORMS)}. escnn's batch norms mix samples and break the per-sample bound.")


@register_grad_sampler([FieldGroupNorm, FieldNorm])
def field_norm_grad_sample(layer: _FieldNorm, activations: list[torch.Tensor], backprops: torch.Tensor):
    """Exact per-sample gradients of the field-tied affine: sums over each field's channels and positions."""
    n = backprops.shape[0]
    per_field = lambda t: t.reshape(n, layer.num_fields, -1).sum(-1)  # noqa: E731
    ret = {}
    if layer.weight is not None and layer.weight.requires_grad:
        ret[layer.weight] = per_field(layer.normalize(activations[0].to(backprops.dtype)) * backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = per_field(backprops)
    return ret


def fields_for(channels: int, order: int) -> int:
    """Regular fields standing in for ``channels`` plain channels: ``int(channels * sqrt(1.5 |G|) / |G|)``
    (Hölzl et al.'s rule). A regular field of a group of order |G| has |G| channels, and an R2Conv between
    regular fields has about |G| times fewer free parameters per channel pair, so parameter counts stay close
    to the plain network's while activations grow by ``sqrt(1.5 |G|)``."""
    return max(1, int(channels * math.sqrt(1.5 * order) / order))


def group_pool(x: torch.Tensor, field_size: int) -> torch.Tensor:
    """Max over the channels of each regular field: ``[B, F*|G|, H, W] -> [B, F, H, W]``, invariant."""
    b, c, h, w = x.shape
    return x.view(b, c // field_size, field_size, h, w).amax(2)


def export(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in plain torch layers, for inference: every :class:`R2Conv` becomes an ``nn.Conv2d``
    holding its expanded filter and bias, every :class:`FieldGroupNorm` an ``nn.GroupNorm`` with the field-tied
    affine written out per channel. Outputs are unchanged (up to float rounding) and nothing of escnn is left
    in the forward pass. The copy is in eval mode; training it would no longer constrain it to be equivariant.
    """
    out = copy.deepcopy(model).eval()
    for name, module in list(out.named_modules()):
        if isinstance(module, R2Conv):
            w = module.expand_filter(module.weights).detach()
            new = nn.Conv2d(w.shape[1], w.shape[0], module.kernel_size, module.stride, module.padding,
                            module.dilation, bias=module.bias is not None).to(w)
            new.weight.data.copy_(w)
            if module.bias is not None:
                new.bias.data.copy_(module.bias_expansion @ module.bias.detach())
        elif isinstance(module, FieldGroupNorm):
            channels = module.num_fields * module.field_size
            new = nn.GroupNorm(module.num_groups, channels, module.eps, affine=module.weight is not None)
            if module.weight is not None:
                new.to(module.weight)
                new.weight.data.copy_(module.weight.detach().repeat_interleave(module.field_size))
                new.bias.data.copy_(module.bias.detach().repeat_interleave(module.field_size))
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, attr, new)
    return out
