"""The layers of zoo's models, each with exact per-sample gradients; imports only torch, opacus, escnn and kymatio.

* :mod:`zoo.nn.inputs`: the input contract (a finite floating ``[B, C, H, W]`` tensor), checked in one place;
* :mod:`zoo.nn.layers`: weight-standardised convolutions, the GroupNorm family, ScaleNorm, the fixed ScatterNet
  front end, input standardisation, the timm-style ``get_norm_layer`` / ``get_act_layer``;
* :mod:`zoo.nn.equivariant`: escnn's steerable layers kept out of module buffers, so that opacus takes them;
* :mod:`zoo.nn.sparse`: hard-concrete L0 gates and the pruning of closed channels.

Each layer that opacus has no grad sampler for registers its own beside it (``opacus.grad_sample.
register_grad_sampler``), so a zoo model works in a user's own ``PrivacyEngine.make_private``.
"""
