"""Cross-check zoo's epsilon against independent accountants, on a grid and at the settings of zoo's cards.

For each history (Poisson sampling at rate q, Gaussian noise multiplier sigma, add/remove-one neighbours) it prints
and records epsilon from: zoo "rdp" (opacus' RDP on ``zoo.privacy.RDP_ORDERS``: opacus' defaults 1.1..10.9, 12..63, then
64..1024), opacus' RDPAccountant on its own defaults stepped once per step, zoo "prv" (opacus' PRV, which returns the upper end of an ``eps_error=0.01`` band),
dp-accounting's RDP on zoo's orders, dp-accounting's RDP on its own wider default orders (adds 11, 128, 256, 512,
1024), and dp-accounting's PLD (discretisation 1e-4; the tight reference), with the ratios side by side.
Card rows take (epsilon, delta, batch size, steps) from each non-test card's recipe, q = batch_size / N and sigma
from ``zoo.privacy.calibrate_sigma`` exactly as ``zoo train`` does, so they show what zoo's default RDP costs at
zoo's real settings. Nothing in zoo is changed. Histories whose RDP epsilon exceeds ``--max-epsilon`` skip PRV and
PLD (both need memory and time that grow with epsilon: about 10 GB for epsilon ~6700). Reproduce (2 CPU cores,
about 4 minutes): ``python eval/crosscheck_accountants.py``; ``--quick`` runs a small grid.
Writes ``eval/results/accounting/crosscheck.csv`` and ``crosscheck.md`` (a library check, not a model study, so not
included in MODEL_CARD.md, which takes each study folder's ``results.md``).
"""
from __future__ import annotations

import argparse
import itertools
import math
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import dp_accounting
from dp_accounting import pld, rdp
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant

import zoo
from _results import append_row
from zoo.io import write_text
from zoo.privacy import RDP_ORDERS, calibrate_sigma, compute_epsilon
from zoo.catalog.registry import get_card

ORDERS = list(RDP_ORDERS)
WIDE = list(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)  # opacus' orders, 11, and 128, 256, 512, 1024
# training-set sizes N of the card data sets: CIFAR-10 train, PneumoniaMNIST train, ISBI 2012 train split
# (slices 0-19, zoo.data.segmentation); a card's q = batch_size / N, as in zoo.training.engine.train
SMALL_EPS = 12.0  # the table splits dp-accounting's fractional-order gap at this RDP epsilon
DATASET_SIZES = {"cifar10": 50_000, "pneumoniamnist": 4708, "isbi2012": 20}
FIELDS = ["source", "q", "sigma", "steps", "delta", "zoo_rdp", "zoo_rdp_order", "opacus_rdp_stepped", "zoo_prv",
          "google_rdp_opacus_orders", "google_rdp_wide", "google_rdp_wide_order", "opacus_rdp_wide",
          "opacus_rdp_wide_order", "google_pld", "zoo_rdp_over_pld", "opacus_rdp_wide_over_pld",
          "zoo_rdp_over_opacus_rdp_wide", "zoo_prv_minus_pld",
          "google_rdp_opacus_orders_rel_diff", "stepped_rel_diff", "prv_s", "pld_s"]


def dp_event(history: list) -> dp_accounting.DpEvent:
    """dp-accounting's event for opacus' history [(sigma, q, steps), ...]."""
    return dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), int(n)) for s, q, n in history])


def google_rdp(history: list, delta: float, orders=None) -> tuple[float, float]:
    """(epsilon, optimal order) of dp-accounting's RdpAccountant; ``orders=None`` is its own default grid."""
    acc = rdp.RdpAccountant(orders)
    acc.compose(dp_event(history))
    eps, order = acc.get_epsilon_and_optimal_order(delta)
    return float(eps), float(order)


def google_pld(history: list, delta: float) -> float:
    acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_event(history))
    return float(acc.get_epsilon(delta))


def stepped(history: list, delta: float) -> float:
    """opacus' RDPAccountant driven as a training loop drives it: one ``step()`` per step."""
    acc = RDPAccountant()
    for s, q, n in history:
        for _ in range(int(n)):
            acc.step(noise_multiplier=s, sample_rate=q)
    return float(acc.get_epsilon(delta))


def opacus_rdp(history: list, delta: float, orders: list) -> tuple[float, float]:
    """(epsilon, optimal order) of opacus' RDP analysis (exact at fractional orders) on ``orders``."""
    curve = sum(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in history)
    eps, order = get_privacy_spent(orders=orders, rdp=curve, delta=delta)
    return float(eps), float(order)


def measure(source: str, sigma: float, q: float, steps: int, delta: float, max_epsilon: float) -> dict:
    h = [(sigma, q, steps)]
    zr = compute_epsilon(h, delta, "rdp")
    order, (wide, wide_order) = opacus_rdp(h, delta, ORDERS)[1], opacus_rdp(h, delta, WIDE)
    st, gro, (grw, grw_order) = stepped(h, delta), google_rdp(h, delta, ORDERS)[0], google_rdp(h, delta)
    row = {"source": source, "q": q, "sigma": sigma, "steps": steps, "delta": delta, "zoo_rdp": zr,
           "zoo_rdp_order": order, "opacus_rdp_stepped": st, "google_rdp_opacus_orders": gro,
           "google_rdp_wide": grw, "google_rdp_wide_order": grw_order, "opacus_rdp_wide": wide,
           "opacus_rdp_wide_order": wide_order, "zoo_rdp_over_opacus_rdp_wide": zr / wide,
           "google_rdp_opacus_orders_rel_diff": gro / zr - 1, "stepped_rel_diff": st / zr - 1}
    if zr <= max_epsilon:
        t = time.perf_counter()
        row["zoo_prv"] = compute_epsilon(h, delta, "prv")
        row["prv_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        row["google_pld"] = tight = google_pld(h, delta)
        row["pld_s"] = round(time.perf_counter() - t, 2)
        row.update(zoo_rdp_over_pld=zr / tight, opacus_rdp_wide_over_pld=wide / tight,
                   zoo_prv_minus_pld=row["zoo_prv"] - tight)
    return row


def card_points() -> list[tuple[str, float, float, int, float]]:
    """(cards, sigma, q, steps, delta) of every non-test card, one row per distinct setting."""
    seen: dict[tuple, list[str]] = {}
    for name in zoo.list_models():
        r = get_card(name).get("recipe") or {}
        if name.startswith("test-") or r.get("dataset") not in DATASET_SIZES or math.isinf(r.get("epsilon", 0)):
            continue
        seen.setdefault((r["dataset"], r["epsilon"], r["delta"], r["batch_size"], r["steps"]), []).append(name)
    out = []
    for (ds, eps, delta, batch, steps), names in seen.items():
        q = batch / DATASET_SIZES[ds]
        sigma = calibrate_sigma(eps, delta, q, steps, "rdp")
        out.append((f"card {names[0]}" + (f" (+{len(names) - 1})" if len(names) > 1 else ""), sigma, q, steps, delta))
    return out


def fmt(v, digits: int = 4) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.{digits}g}"


def span(rows: list[dict], key: str, f: str = ".3g") -> str:
    vals = [r[key] for r in rows if r.get(key) not in (None, "")]
    return f"[{min(vals):{f}}, {max(vals):{f}}]" if vals else "-"


def table(rows: list[dict], grid_text: str) -> str:
    cards, grid = [r for r in rows if r["source"] != "grid"], [r for r in rows if r["source"] == "grid"]
    top = [r for r in rows if r["zoo_rdp_order"] == ORDERS[-1]]
    small = [r for r in rows if r["zoo_rdp"] <= SMALL_EPS]
    large = [r for r in rows if r["zoo_rdp"] > SMALL_EPS]
    helped = [r for r in rows if r["zoo_rdp_over_opacus_rdp_wide"] > 1 + 1e-9]  # wider orders gave a smaller epsilon
    head = [
        "# zoo's epsilon against independent accountants", "",
        f"Made by `python eval/crosscheck_accountants.py` (dp-accounting {version('dp-accounting')}, opacus "
        f"{version('opacus')}). "
        f"Grid: {grid_text}; plus every non-test card (q = batch/N, sigma = `calibrate_sigma` at the card's "
        "epsilon, as `zoo train` does; `(+k)`: k more cards with the same setting). Columns: zoo rdp = opacus RDP "
        "on its default orders 1.1..10.9, 12..63 (optimal order in brackets); stepped = opacus' RDPAccountant with "
        "one `step()` per step; zoo prv = opacus PRV (upper end of its `eps_error=0.01` band); G rdp (op) / "
        "G rdp (wide) = dp-accounting RDP on opacus' orders / on its own default orders (adds 11, 128..1024); "
        "wide rdp = opacus' exact RDP on those wider orders; G pld = dp-accounting PLD (discretisation 1e-4), the "
        "tight reference. PRV and PLD are skipped (-) where RDP epsilon is past the cap.", "",
        "Tolerances (asserted in tests/test_accounting.py on a smaller grid): stepped = zoo rdp; the RDP -> epsilon "
        "conversion is the same formula in both libraries (1e-12); RDP over the integer orders agrees to 1e-9; "
        "over opacus' full orders zoo rdp <= G rdp (op), and <= zoo rdp * 1.02 up to epsilon 12, because "
        "dp-accounting 0.6 over-bounds fractional orders (it sums the absolute values of a sign-alternating "
        "series; opacus matches mpmath quadrature to 1e-8); 0 <= zoo prv - G pld <= 0.015; "
        "zoo rdp >= G pld - 1e-3.", "",
        f"Reading ({len(rows)} rows). stepped / zoo rdp - 1 in {span(rows, 'stepped_rel_diff', '.1e')}. "
        f"G rdp (op) / zoo rdp - 1 in {span(small, 'google_rdp_opacus_orders_rel_diff', '.1e')} where zoo rdp <= "
        f"{SMALL_EPS:g}, {span(large, 'google_rdp_opacus_orders_rel_diff', '.1e')} above (the optimum moves to "
        "orders near 2 and below, where dp-accounting's fractional-order series is loosest or is dropped unconverged). "
        f"zoo prv - G pld in {span(rows, 'zoo_prv_minus_pld', '.4f')}. "
        f"zoo rdp / G pld: cards {span(cards, 'zoo_rdp_over_pld')}, grid {span(grid, 'zoo_rdp_over_pld')}. "
        f"zoo rdp / wide rdp: cards {span(cards, 'zoo_rdp_over_opacus_rdp_wide')}, grid "
        f"{span(grid, 'zoo_rdp_over_opacus_rdp_wide')}; the optimum sits at opacus' last order 63 in {len(top)} "
        "rows (small q or large sigma, small epsilon: opacus warns \"Optimal order is the largest alpha\"); wider "
        f"orders lower epsilon in {len(helped)} rows, {sum(r in top for r in helped)} of them among those. At the "
        f"cards' settings the optimal order is in {span(cards, 'zoo_rdp_order', 'g')}, so the order grid costs "
        "nothing there; the RDP bound itself is what is loose, by the zoo rdp / G pld factor. "
        "zoo keeps opacus' orders and its RDP default: changing them would change every calibrated sigma and the "
        "ledgers of saved checkpoints.", "",
        "| source | q | sigma | steps | delta | zoo rdp (order) | stepped | zoo prv | G rdp (op) | G rdp (wide) "
        "| wide rdp (order) | G pld | zoo rdp / pld | wide rdp / pld | zoo rdp / wide rdp | zoo prv - pld |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    body = [f"| {r['source']} | {r['q']:.4g} | {r['sigma']:.4g} | {r['steps']} | {r['delta']:g} | "
            f"{fmt(r['zoo_rdp'])} ({r['zoo_rdp_order']:g}) | {fmt(r['opacus_rdp_stepped'])} | "
            f"{fmt(r.get('zoo_prv'))} | "
            f"{fmt(r['google_rdp_opacus_orders'])} | {fmt(r['google_rdp_wide'])} | "
            f"{fmt(r['opacus_rdp_wide'])} ({r['opacus_rdp_wide_order']:g}) | {fmt(r.get('google_pld'))} | "
            f"{fmt(r.get('zoo_rdp_over_pld'))} | {fmt(r.get('opacus_rdp_wide_over_pld'))} | "
            f"{fmt(r['zoo_rdp_over_opacus_rdp_wide'])} | {fmt(r.get('zoo_prv_minus_pld'), 3)} |" for r in rows]
    return "\n".join(head + body) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small grid (about a minute)")
    ap.add_argument("--max-epsilon", type=float, default=64.0, help="skip PRV and PLD past this RDP epsilon")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "accounting"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="Optimal order")  # opacus; the order column shows it
    warnings.filterwarnings("ignore", message="divide by zero encountered in log")  # opacus PRV at q = 1
    qs, sigmas, steps, deltas = (([0.005, 0.08, 1.0], [1.0, 5.0], [10, 1000], [1e-5]) if args.quick else
                                 ([0.005, 0.02, 0.08, 0.3, 1.0], [0.5, 1.0, 2.0, 5.0], [10, 300, 1000, 3000],
                                  [1e-5, 1e-4]))
    grid_text = f"q in {qs} x sigma in {sigmas} x steps in {steps} x delta in {deltas}, PRV/PLD cap {args.max_epsilon}"
    points = card_points() + [("grid", s, q, n, d) for q, s, n, d in itertools.product(qs, sigmas, steps, deltas)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "crosscheck.csv"
    csv_path.unlink(missing_ok=True)  # the table is recomputed whole: accountants are deterministic
    rows = []
    for source, s, q, n, d in points:
        row = measure(source, s, q, n, d, args.max_epsilon)
        rows.append(row)
        append_row(csv_path, FIELDS, row)
        print(f"{source:34s} q={q:<8.4g} sigma={s:<7.4g} steps={n:<5d} delta={d:g}: zoo rdp {row['zoo_rdp']:.4g} "
              f"(order {row['zoo_rdp_order']:g}), stepped {row['opacus_rdp_stepped']:.4g}, zoo prv "
              f"{fmt(row.get('zoo_prv'))}, G rdp op/wide {row['google_rdp_opacus_orders']:.4g}/"
              f"{row['google_rdp_wide']:.4g}, G pld {fmt(row.get('google_pld'))}, rdp/pld "
              f"{fmt(row.get('zoo_rdp_over_pld'))}", flush=True)
    write_text(out / "crosscheck.md", table(rows, grid_text))
    print(f"{len(rows)} rows in {csv_path}; table {out / 'crosscheck.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
