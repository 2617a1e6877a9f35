"""Timing helper shared by the benchmarks in eval/ (run as ``python eval/<script>.py``, so this directory is on
``sys.path``)."""
from __future__ import annotations

import time

import torch


def timer(device: torch.device):
    """``time_ms(step) -> ms``: wall time of one call of ``step()``, synchronised on CUDA."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def time_ms(step) -> float:
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        return (time.perf_counter() - t0) * 1e3

    return time_ms
