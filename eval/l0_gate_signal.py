"""Why L0 gates under DP close together, or not at all: each gate's data signal, DP noise and L0 penalty per step.

On ``--n`` real training images, at initialisation, with zoo's exact per-sample gradients (``PerSampleGradients``),
for an L0-gated model (default ``wrn16-4-l0`` on CIFAR-10):
  * the gates' share of a per-sample gradient's squared norm (what clipping leaves them of the budget C);
  * the signal: the mean over the images of the clipped (C = ``--clip``) per-sample gradient of each gate's
    ``log_alpha``: its rms and largest magnitude over the gates;
  * the noise that DP-SGD adds to each coordinate of the averaged gradient: ``sigma C / B`` (``--sigma``,
    ``--batch-size``: the card's recipe by default, sigma calibrated for its epsilon);
  * the L0 penalty's gradient per gate (Louizos et al., ``(lambda / N) |g| P'(open)``; :mod:`zoo.nn.sparse`) at
    ``--l0-lambda`` values, for the cheapest and the dearest gate;
  * the steps after which the rms signal's sum outgrows the noise's random walk: ``(noise / signal)^2``.
If the penalty is far above the signal, the gates close as the penalty orders them (by cost: together, layer by
layer); far below it and below the noise, they do not move. Reparametrising ``log_alpha = k theta`` (a gate
scale ``k``: the WRN's ``l0_gate_scale``, :mod:`zoo.nn.sparse`) multiplies the gates' data gradient, and so their share of the clipped norm, by ``k``, while the noise
per coordinate stays ``sigma C / B``: the signal-to-noise ratio grows by about ``k``; the table gives it for
``--scales`` (while their share of the squared norm stays below about 10 %, where clipping scales the other
coordinates alike). Reproduce (a minute on 2 CPU cores):
    python eval/l0_gate_signal.py --model wrn16-4-l0 --n 32
Writes ``eval/results/l0-gate-signal/results.md`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

import zoo
from zoo.data import get_dataset_info
from zoo.data.tasks import task_of
from zoo.dp.grad_sample import PerSampleGradients
from zoo.io import write_text
from zoo.nn.sparse import BETA, GAMMA, ZETA, gate_modules
from zoo.privacy import calibrate_sigma


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="wrn16-4-l0")
    ap.add_argument("--model-args", type=json.loads, default={},
                    help='JSON overrides of the card\'s architecture, e.g. \'{"l0": true, "l0_gate_scale": 10}\'')
    ap.add_argument("--n", type=int, default=32, help="training images (one per-sample gradient each)")
    ap.add_argument("--clip", type=float, help="default: the card's clip norm")
    ap.add_argument("--batch-size", type=int, help="default: the card's")
    ap.add_argument("--steps", type=int, help="default: the card's")
    ap.add_argument("--sigma", type=float, help="default: calibrated for the card's epsilon, delta, B, S")
    ap.add_argument("--l0-lambdas", nargs="+", type=float, default=[0.001, 0.01, 0.1, 1.0])
    ap.add_argument("--scales", nargs="+", type=float, default=[1.0, 10.0, 100.0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "l0-gate-signal"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    info = zoo.model_info(args.model)
    rec = info["recipe"]
    data = get_dataset_info(rec["dataset"])
    ds = data.load("train", data_dir=args.data_dir)
    n_train = len(ds)
    clip, b, s = args.clip or rec["clip_norm"], args.batch_size or rec["batch_size"], args.steps or rec["steps"]
    sigma = args.sigma or calibrate_sigma(rec["epsilon"], rec["delta"], b / n_train, s, rec.get("accountant", "rdp"))
    model = zoo.create_model(args.model, **args.model_args)
    model.train()
    x, y = ds.batch(torch.randperm(len(ds))[: args.n])
    psg = PerSampleGradients(model)
    grads, _, _ = psg(x, y, task_of(model).loss)
    psg.close()
    gates = gate_modules(model)
    if not gates:
        ap.error(f"{args.model} has no L0 gates: give an L0 model, or --model-args '{{\"l0\": true}}'")
    names = {id(p): k for k, p in model.named_parameters()}
    gate_names = [names[id(g.log_alpha)] for g in gates]
    sq = sum(v.reshape(args.n, -1).pow(2).sum(1) for v in grads.values())
    gate_sq = sum(grads[k].reshape(args.n, -1).pow(2).sum(1) for k in gate_names)
    factor = (clip / sq.sqrt()).clamp(max=1.0)
    signal = torch.cat([(grads[k].reshape(args.n, -1) * factor[:, None]).mean(0) for k in gate_names])
    rms, top = signal.pow(2).mean().sqrt().item(), signal.abs().max().item()
    noise = sigma * clip / b
    slope = [torch.sigmoid(g.log_alpha.detach() - BETA * math.log(-GAMMA / ZETA)) for g in gates]
    dp = [(x * (1 - x)).mean().item() for x in slope]  # P'(open) at init, per gate module
    costs = [g.cost for g in gates]
    model_args = f" --model-args '{json.dumps(args.model_args)}'" if args.model_args else ""
    flags = "".join(f" --{k.replace('_', '-')} {v:g}" for k, v in
                    (("clip", args.clip), ("batch_size", args.batch_size), ("steps", args.steps), ("sigma", args.sigma))
                    if v is not None)
    lines = [f"### L0 gates under DP: signal, noise and penalty per step (`{args.model}`, at initialisation)", "",
             f"From `eval/l0_gate_signal.py --model {args.model}{model_args} --n {args.n}{flags}` on {args.n} {rec['dataset']} training "
             f"images (seed {args.seed}): B = {b}, S = {s}, C = {clip:g}, σ = {sigma:.3f} (ε = {rec['epsilon']:g}, "
             f"δ = {rec['delta']:g}, N = {n_train:,}), {sum(g.log_alpha.numel() for g in gates)} gates.", "",
             f"- per-sample gradient norm (median): {sq.sqrt().median():.3g}; the gates' share of its square "
             f"(median): {(gate_sq / sq).median():.2e}",
             f"- signal, the mean clipped gradient of a gate's log α: rms {rms:.2e}, largest {top:.2e}",
             f"- noise per coordinate of the averaged gradient, σC/B: {noise:.2e}",
             f"- steps for the rms signal's sum to outgrow the noise's random walk, (noise / signal)²: "
             f"{(noise / rms) ** 2:,.0f} (the card runs {s:,})", "",
             "| λ | penalty gradient per gate, cheapest (cost) | dearest (cost) | penalty / rms signal |",
             "|---|---|---|---|"]
    lo, hi = min(range(len(gates)), key=costs.__getitem__), max(range(len(gates)), key=costs.__getitem__)
    for lam in args.l0_lambdas:
        pen = [lam / n_train * c * d for c, d in zip(costs, dp)]
        lines.append(f"| {lam:g} | {pen[lo]:.2e} ({costs[lo]:g}) | {pen[hi]:.2e} ({costs[hi]:g}) | "
                     f"{pen[hi] / rms:.2g} |")
    lines += ["", "Gate scale k (log α = k θ): the gates' data gradient and their share of the clipped norm grow by "
              "k (their share of its square by k²), the noise per coordinate does not:", "",
              "| k | gates' share of the squared norm | signal / noise per step | steps to outgrow the noise |",
              "|---|---|---|---|"]
    share = (gate_sq / sq).median().item()
    for k in args.scales:
        sh = share * k * k / (1 - share + share * k * k)
        snr = k * rms / noise  # while the gates' share stays small, clipping scales the rest alike
        lines.append(f"| {k:g} | {sh:.2e} | {snr:.2g} | {max(1, round(1 / snr ** 2)):,} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
