"""Benchmark one DP-SGD step against one non-private step for every registered zoo model.

For each model, on a random batch (``--batch-size`` samples of ``in_chans x image-size x image-size``), it
reports the median wall time over ``--repeats`` runs (after one warm-up run) of:
  (a) a non-private step: forward, mean cross-entropy, backward, SGD step;
  (b) a DP-SGD step as ``zoo.engine._run`` does it (one physical batch, no augmentation multiplicity):
      per-sample gradients (``PerSampleGradients``), ``clip_per_sample`` with C=1, summed, ``add_noise`` with
      std = sigma * C (sigma=1), ``p.grad = noisy / B``, SGD step;
  (c) the memory held by the per-sample gradients: sum over parameters of B * numel * element size (MiB),
      taken from the tensors ``PerSampleGradients`` returns.
Progress goes to stderr, the table to stdout. Reproduce (all models; several minutes on 2 CPU cores):
    python eval/bench_dp_step.py --batch-size 64 --repeats 3
Only the small models, with JSON output:  ... --models 'wrn16-*' 'test-*' --json bench.json
With ``--compare-vmap``, zoo's per-sample gradients alone are also timed against whole-model ``torch.func``
``vmap(grad)`` (the route of Hölzl et al.'s code) at each of ``--chunk-sizes`` (0 = no chunking), and the
best chunk size is reported:  ... --models 'eq-*' --compare-vmap --chunk-sizes 0 16 32
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import zoo
from zoo.engine import add_noise, clip_per_sample
from zoo.grad_sample import PerSampleGradients

CLIP_NORM, SIGMA, LR = 1.0, 1.0, 0.1


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median_ms(step, repeats: int, device: torch.device) -> float:
    """Median wall time of ``step()`` in ms over ``repeats`` runs, after one warm-up run."""
    times, sync = [], (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for i in range(repeats + 1):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i:  # run 0 is the warm-up
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def vmap_per_sample_ms(model, x, y, chunk_sizes, repeats: int, device: torch.device) -> tuple[float, int]:
    """Best median time of whole-model ``vmap(grad)`` per-sample gradients over ``chunk_sizes``."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),), tie_weights=False)
        return F.cross_entropy(out, yi.unsqueeze(0))

    best = None
    for chunk in chunk_sizes:
        f = vmap(grad(loss), in_dims=(None, 0, 0), chunk_size=chunk or None)
        ms = median_ms(lambda: f(params, x, y), repeats, device)
        if best is None or ms < best[0]:
            best = (ms, chunk)
    return best


def bench(name: str, batch: int, repeats: int, image_size: int, device: torch.device,
          chunk_sizes: list[int] | None = None) -> dict:
    torch.manual_seed(0)
    model = zoo.create_model(name).to(device).train()
    x = torch.randn(batch, model.in_chans, image_size, image_size, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def plain_step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    plain = median_ms(plain_step, repeats, device)  # timed before opacus' hooks are attached
    psg = PerSampleGradients(model)
    params = dict(psg.params)
    gen = torch.Generator(device=device).manual_seed(0)
    psg_bytes = []

    def dp_step():  # the body of the step loop in zoo.engine._run, one chunk, views=1
        summed = {n: torch.zeros_like(p) for n, p in params.items()}
        grads, _, _ = psg(x, y)
        psg_bytes.append(sum(g.numel() * g.element_size() for g in grads.values()))
        clipped, _ = clip_per_sample(grads, CLIP_NORM)
        for n in summed:
            summed[n] += clipped[n]
        noisy = add_noise(summed, SIGMA * CLIP_NORM, gen)
        for n, p in params.items():
            p.grad = noisy[n] / batch
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        dp = median_ms(dp_step, repeats, device)
        ours = median_ms(lambda: psg(x, y), repeats, device) if chunk_sizes else None
    finally:
        psg.close()
    row = {"model": name, "params": zoo.model_info(name)["num_params"], "batch": batch, "plain_ms": plain,
           "dp_ms": dp, "ratio": dp / plain, "psg_mib": max(psg_bytes) / 2**20}
    if chunk_sizes:
        vm, chunk = vmap_per_sample_ms(model, x, y, chunk_sizes, repeats, device)
        row.update(psg_ms=ours, vmap_ms=vm, vmap_chunk=chunk, speedup=vm / ours)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["*"], help="shell patterns of model names (default: all)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up (median reported)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    ap.add_argument("--compare-vmap", action="store_true", help="also time whole-model torch.func vmap(grad)")
    ap.add_argument("--chunk-sizes", nargs="+", type=int, default=[0, 16, 32], help="vmap chunk sizes (0: none)")
    args = ap.parse_args()
    names = sorted({n for pat in args.models for n in zoo.list_models(pat)})
    if not names:
        ap.error(f"no registered model matches {args.models}; known: {zoo.list_models()}")
    device = torch.device(args.device)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    header = (f"torch {torch.__version__} | device {device}{gpu} | threads {torch.get_num_threads()}"
              f" | load avg {os.getloadavg()[0]:.2f} | median of {args.repeats} runs after 1 warm-up")
    log(header)
    rows, failed = [], []
    for name in names:
        log(f"[{len(rows) + len(failed) + 1}/{len(names)}] {name} ...")
        try:
            rows.append(bench(name, args.batch_size, args.repeats, args.image_size, device,
                              args.chunk_sizes if args.compare_vmap else None))
            log("    non-private {plain_ms:.1f} ms, DP {dp_ms:.1f} ms, x{ratio:.2f}".format(**rows[-1]))
        except Exception as e:
            log(traceback.format_exc())
            failed.append({"model": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
    cols = ["model", "params", "batch", "non-private ms", "DP ms", "DP/non-private", "per-sample grad MiB"]
    fmt = "{:<20} {:>10} {:>6} {:>15} {:>10} {:>15} {:>20}"
    print(header, "\n" + fmt.format(*cols), "\n" + "-" * 102, sep="")
    for r in rows:
        print(fmt.format(r["model"], f"{r['params']:,}", r["batch"], f"{r['plain_ms']:.1f}", f"{r['dp_ms']:.1f}",
                         f"{r['ratio']:.2f}", f"{r['psg_mib']:.1f}"))
    if args.compare_vmap:
        print("\nper-sample gradients alone: zoo (opacus hooks + registered samplers) vs whole-model torch.func vmap")
        print(f"{'model':<20} {'zoo ms':>10} {'vmap ms':>10} {'best chunk':>11} {'vmap / zoo':>11}")
        for r in rows:
            print(f"{r['model']:<20} {r['psg_ms']:>10.1f} {r['vmap_ms']:>10.1f} {r['vmap_chunk'] or 'none':>11} "
                  f"{r['speedup']:>11.2f}")
    for f in failed:
        print(f"{f['model']:<20} FAILED ({f['error'][:150]}; traceback on stderr)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"header": header, "args": vars(args), "results": rows, "failed": failed}, fh, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
