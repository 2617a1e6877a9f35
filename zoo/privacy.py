"""zoo's privacy API: accounting (:mod:`zoo.dp.accounting`: noise calibration, the privacy ledger, the budget rule) and
``zoo.privacy.tan`` (:mod:`zoo.dp.tan`: TAN scaling laws, built on the accounting). See :mod:`zoo.dp.accounting` for the
guarantee the accounting assumes."""
from __future__ import annotations

from zoo.dp import tan
from zoo.dp.accounting import (ACCOUNTANTS, NEIGHBOURING, RDP_ORDERS, BudgetExhaustedError, LargestOrderWarning, Ledger,
                         calibrate_sigma, compute_epsilon)

__all__ = ["ACCOUNTANTS", "NEIGHBOURING", "RDP_ORDERS", "BudgetExhaustedError", "LargestOrderWarning", "Ledger",
           "calibrate_sigma", "compute_epsilon", "tan"]
