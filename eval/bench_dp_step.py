"""Benchmark one DP-SGD step against one non-private step for every registered zoo model.

For each model, on a random batch (``--batch-size`` samples of ``in_chans x image-size x image-size``), it
reports the median wall time over ``--repeats`` rounds (after one warm-up round; every variant runs once per
round, interleaved, so that drift of the machine hits all alike) of:
  (a) a non-private step: forward, mean of the task's loss (cross-entropy; Dice + cross-entropy for
      segmentation models, :mod:`zoo.data.tasks`), backward, SGD step;
  (b) zoo's DP-SGD step, the one training calls (``zoo.dp.step.DPStep``; one physical batch holding every
      sample, no augmentation multiplicity): per-sample gradients, clipping with C=1, noise with sigma=1,
      division by B, any data-free penalty gradient, SGD step;
  (c) the memory held by the per-sample gradients: sum over parameters of B * numel * element size (MiB),
      taken from the tensors ``PerSampleGradients`` returns, and the same at the card's physical batch size:
      the engine computes per-sample gradients one physical batch at a time, so that is the bound in training.
On CPU, large temporaries are fresh ``mmap`` pages in every step under glibc's default malloc, and page faults
can dominate; the header prints any ``MALLOC_*`` settings, e.g. run once more with
``MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184`` to keep freed memory for reuse.
Progress goes to stderr, the table to stdout. Reproduce (all models; several minutes on 2 CPU cores):
    python eval/bench_dp_step.py --batch-size 64 --repeats 3
Only the small models, with JSON output:  ... --models 'wrn16-*' 'scatternet-*' --json bench.json
Segmentation models (per-pixel loss; the image size is rounded up to each model's size multiple):
    python eval/bench_dp_step.py --models 'unet*' 'eq-unet*' 'linknet*' 'deeplab*' --batch-size 16 --image-size 64
With ``--align all|subset``, a DP-SGD step with gradient self-alignment (:mod:`zoo.dp.alignment`: per-sample gradients
of the self-aligned loss, a per-sample Hessian-vector product through ``torch.func``; random public reference) is
timed too, and its ratio to the plain DP step printed:  ... --models 'wrn16-1' 'eq-resnet9-c4' --align subset
With ``--compare-vmap``, zoo's per-sample gradients alone are also timed against whole-model ``torch.func``
``vmap(grad)`` (the route of Hölzl et al.'s code) at each of ``--chunk-sizes`` (0 = no chunking), and the
best chunk size is reported:  ... --models 'eq-*' --compare-vmap --chunk-sizes 0 16 32
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import traceback

import torch

import zoo
from _timing import timer
from zoo.dp.alignment import AlignedPerSampleGradients, AlignSettings
from zoo.dp.step import DPStep
from zoo.dp.grad_sample import PerSampleGradients
from zoo.data.tasks import task_of

CLIP_NORM, SIGMA, LR = 1.0, 1.0, 0.1


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def vmap_step(model, x, y, chunk: int):
    """Whole-model ``vmap(grad)`` per-sample gradients (Hölzl et al.'s route) as a closure."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    task = task_of(model)

    def loss(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),), tie_weights=False)
        return task.loss(out, yi.unsqueeze(0)).sum()

    f = vmap(grad(loss), in_dims=(None, 0, 0), chunk_size=chunk or None)
    return lambda: f(params, x, y)


def dp_step_fn(psg, x, y, batch: int, device: torch.device):
    """zoo's DP-SGD step (:class:`zoo.dp.step.DPStep`, what training calls), on the one physical batch ``(x, y)``
    (views=1): every sample is in the batch (q = 1), so the sampling draw is timed too but changes nothing."""
    opt = torch.optim.SGD(dict(psg.params).values(), lr=LR)
    dp_step = DPStep(psg, opt, n=batch, sample_rate=1.0, sigma=SIGMA, clip_norm=CLIP_NORM, expected_batch=batch,
                     views=1, seed=0, device=device, score=task_of(psg.model).score)
    count = itertools.count()
    return lambda: dp_step(next(count), lambda idx, gen: [(x, y)])


def bench(name: str, batch: int, repeats: int, image_size: int, device: torch.device,
          chunk_sizes: list[int] | None = None, align: str | None = None) -> dict:
    """Time every variant once per round, ``repeats`` rounds after a warm-up round, interleaved so that a drift
    of the machine (other load, memory reclaim) hits all of them alike; report medians."""
    torch.manual_seed(0)
    model = zoo.create_model(name).to(device).train()
    task, m = task_of(model), model.size_multiple
    image_size = -(-max(image_size, model.min_size) // m) * m  # rounded up to a multiple of m
    x = torch.randn(batch, model.in_chans, image_size, image_size, device=device)
    y = task.example_targets(batch, model.num_classes, (image_size, image_size)).to(device)
    bare = copy.deepcopy(model)  # the plain step and vmap run on a copy without opacus' hooks
    bare_opt = torch.optim.SGD(bare.parameters(), lr=LR)
    aligned = copy.deepcopy(model) if align else None  # torch.func runs on a copy without hooks, too
    psg = PerSampleGradients(model)
    gen = torch.Generator(device=device).manual_seed(0)
    psg_bytes = []

    def plain_step():
        bare_opt.zero_grad(set_to_none=True)
        task.loss(bare(x), y).mean().backward()
        bare_opt.step()

    def psg_step():  # per-sample gradients alone; also records their memory
        grads = psg(x, y)[0]
        psg_bytes.append(sum(g.numel() * g.element_size() for g in grads.values()))

    variants = {"plain": plain_step, "dp": dp_step_fn(psg, x, y, batch, device), "psg": psg_step}
    if align:
        apsg = AlignedPerSampleGradients(aligned, AlignSettings(align))
        apsg.set_reference({n: torch.randn(p.shape, generator=gen, device=device) for n, p in apsg.params.items()})
        variants["aligned"] = dp_step_fn(apsg, x, y, batch, device)
    if chunk_sizes:
        variants.update({f"vmap{c}": vmap_step(bare, x, y, c) for c in chunk_sizes})
    time_ms, times = timer(device), {k: [] for k in variants}
    try:
        for r in range(repeats + 1):  # round 0 is the warm-up
            for k, step in variants.items():
                ms = time_ms(step)
                if r:
                    times[k].append(ms)
    finally:
        psg.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    card = zoo.model_info(name)
    phys = card["recipe"]["physical_batch_size"]
    row = {"model": name, "params": card["num_params"], "batch": batch, "image_size": image_size,
           "plain_ms": med["plain"],
           "dp_ms": med["dp"], "ratio": med["dp"] / med["plain"], "psg_mib": max(psg_bytes) / 2**20,
           "physical_batch": phys, "psg_mib_physical": max(psg_bytes) / 2**20 * phys / batch}
    if align:
        row.update(align=align, aligned_ms=med["aligned"], aligned_ratio=med["aligned"] / med["dp"])
    if chunk_sizes:
        chunk = min(chunk_sizes, key=lambda c: med[f"vmap{c}"])
        vm = med[f"vmap{chunk}"]
        row.update(psg_ms=med["psg"], vmap_ms=vm, vmap_chunk=chunk, speedup=vm / med["psg"],
                   vmap_all_ms={c: med[f"vmap{c}"] for c in chunk_sizes})
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
    ap.add_argument("--align", choices=["all", "subset"], help="also time a DP step with gradient self-alignment")
    ap.add_argument("--chunk-sizes", nargs="+", type=int, default=[0, 16, 32], help="vmap chunk sizes (0: none)")
    args = ap.parse_args()
    names = sorted({n for pat in args.models for n in zoo.list_models(pat)})
    if not names:
        ap.error(f"no registered model matches {args.models}; known: {zoo.list_models()}")
    device = torch.device(args.device)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    malloc = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")) or "default"
    header = (f"torch {torch.__version__} | device {device}{gpu} | threads {torch.get_num_threads()}"
              f" | load avg {os.getloadavg()[0]:.2f} | malloc {malloc}"
              f" | median of {args.repeats} interleaved rounds after 1 warm-up")
    log(header)
    rows, failed = [], []
    for name in names:
        log(f"[{len(rows) + len(failed) + 1}/{len(names)}] {name} ...")
        try:
            rows.append(bench(name, args.batch_size, args.repeats, args.image_size, device,
                              args.chunk_sizes if args.compare_vmap else None, args.align))
            log("    non-private {plain_ms:.1f} ms, DP {dp_ms:.1f} ms, x{ratio:.2f}".format(**rows[-1]))
        except Exception as e:
            log(traceback.format_exc())
            failed.append({"model": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
    cols = ["model", "params", "batch x size", "non-private ms", "DP ms", "DP/non-private", "per-sample MiB",
            "MiB at phys. batch"]
    fmt = "{:<20} {:>10} {:>12} {:>15} {:>10} {:>15} {:>15} {:>19}"
    print(header, "\n" + fmt.format(*cols), "\n" + "-" * 124, sep="")
    for r in rows:
        print(fmt.format(r["model"], f"{r['params']:,}", f"{r['batch']} x {r['image_size']}", f"{r['plain_ms']:.1f}", f"{r['dp_ms']:.1f}",
                         f"{r['ratio']:.2f}", f"{r['psg_mib']:.1f}",
                         f"{r['psg_mib_physical']:.1f} (B={r['physical_batch']})"))
    if args.align:
        print(f"\nDP step with gradient self-alignment ({args.align}) vs the plain DP step")
        print(f"{'model':<20} {'DP ms':>10} {'aligned ms':>11} {'aligned / DP':>13} {'aligned / non-private':>22}")
        for r in rows:
            print(f"{r['model']:<20} {r['dp_ms']:>10.1f} {r['aligned_ms']:>11.1f} {r['aligned_ratio']:>13.2f} "
                  f"{r['aligned_ms'] / r['plain_ms']:>22.2f}")
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
