"""Differential privacy: per-sample gradients, clipping and noise, the one DP-SGD step, accounting.

Knows no data set and no card: a model, a batch and numbers in, a released gradient and a ledger out.

* :mod:`zoo.dp.objectives`: the batch check and per-sample loss of each task name;
* :mod:`zoo.dp.validate`: which models have exact per-sample gradients;
* :mod:`zoo.dp.grad_sample`: exact per-sample gradients (opacus hooks, ``torch.func`` where they cannot);
* :mod:`zoo.dp.alignment`: gradient self-alignment (Bani-Harouni et al. 2023);
* :mod:`zoo.dp.data_norm`: input statistics released by the Gaussian mechanism;
* :mod:`zoo.dp.distributed`: several processes, one noise draw after the sum;
* :mod:`zoo.dp.step`: the one DP-SGD step that training, the audit and the benchmark call;
* :mod:`zoo.dp.accounting`: the ledger, RDP/PRV accountants, sigma calibration; :mod:`zoo.dp.tan`: TAN's
  scaling laws (Sander et al. 2023). The public face of both is :mod:`zoo.privacy`.
"""
