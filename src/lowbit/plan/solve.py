"""Allocation solver: one candidate per layer, least total predicted error within a size budget.

This is a multiple-choice knapsack (MCKP): layer l picks candidate k at cost c_lk (bytes) and
predicted error e_lk; minimise Σ e under Σ c ≤ B (or the least Σ c with Σ e ≤ bound).

**Lagrangian relaxation → Pareto hull.** For a multiplier λ ≥ 0 each layer independently picks
argmin_k e_lk + λ·c_lk. Sweeping λ from ∞ to 0 walks the lower convex hull of the achievable
(size, error) points: per layer, only the vertices of its own lower convex hull are ever chosen, and
the sweep applies every layer's hull segments in order of decreasing slope −Δe/Δc (a greedy that is
exact *on the hull*). That is the Pareto front reported (:func:`pareto_hull`), and at a budget B its
interpolation gives a lower bound on the optimum (the LP relaxation's value; the duality gap is at
most one layer's step).

**Exact DP for the budget.** The hull's vertices are only optimal where the budget falls on one;
between them a hull solution leaves up to one layer step of the budget unused — on a small model,
several percent of it. So the budget solution comes from a dynamic program over cost: layers in
order, ``dp[c]`` = least error with extra cost exactly c above every layer's cheapest candidate.
Costs are integers (bytes) and are divided by their greatest common divisor; while the range then
needs at most ``max_cells`` cells the DP is **exact**. Beyond that (very large models), costs are
rounded *up* to a coarser unit, so the answer stays feasible in true bytes and is near-exact (the
rounding loses at most one unit per layer of budget), then a greedy repair spends the true slack
on the single-layer upgrades that remove the most error. The result is never worse than the best
hull vertex within the budget, and its gap to the Lagrangian lower bound is reported.

Everything is deterministic: ties go to the lower candidate index and the earlier cost cell.
Dominated candidates (another is no larger and no worse) are dropped per layer first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import reduce

import torch

from lowbit.errors import InvalidSpecError

MAX_CELLS = 1 << 18  # DP cells (cost resolution); L × cells bytes of back-pointers


@dataclass
class Solution:
    """One allocation: ``choices[l]`` is the candidate index of layer l."""

    choices: list[int]
    cost: int                  # Σ bytes of the chosen candidates
    error: float               # Σ predicted errors
    exact: bool = False        # proven optimal (exact DP)
    lower_bound: float | None = None  # Lagrangian lower bound on the optimum at this budget
    method: str = ""
    info: dict = field(default_factory=dict)


Table = list[list[float | None]]


def _options(costs: list[list[int | None]], errors: Table) -> list[list[int]]:
    """Per layer: candidate indices that apply and are not dominated, sorted by cost (then index)."""
    out = []
    for layer, (c_row, e_row) in enumerate(zip(costs, errors)):
        ks = [k for k in range(len(c_row)) if c_row[k] is not None and e_row[k] is not None]
        if not ks:
            raise InvalidSpecError(f"layer {layer}: no candidate applies")
        ks.sort(key=lambda k: (c_row[k], e_row[k], k))
        kept: list[int] = []
        for k in ks:  # increasing cost: keep k only if it is strictly better than everything cheaper
            if not kept or e_row[k] < e_row[kept[-1]]:
                if kept and c_row[k] == c_row[kept[-1]]:
                    continue  # same cost, and (sorted) no better error: dominated
                kept.append(k)
        out.append(kept)
    return out


def _total(costs: list[list[int | None]], errors: Table, choices: list[int]) -> tuple[int, float]:
    return (sum(int(costs[i][k]) for i, k in enumerate(choices)),  # type: ignore[arg-type]
            math.fsum(float(errors[i][k]) for i, k in enumerate(choices)))  # type: ignore[arg-type]


def _layer_hull(opts: list[int], c_row: list[int | None], e_row: list[float | None]) -> list[int]:
    """Vertices of the layer's lower convex hull (cost ascending, error descending), collinear points dropped."""
    hull: list[int] = []
    for k in opts:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above (or on) the segment a→k: not a hull vertex
            lhs = (e_row[b] - e_row[a]) * (c_row[k] - c_row[a])  # type: ignore[operator]
            rhs = (e_row[k] - e_row[a]) * (c_row[b] - c_row[a])  # type: ignore[operator]
            if lhs >= rhs:
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


def pareto_hull(costs: list[list[int | None]], errors: Table) -> list[Solution]:
    """The Lagrangian sweep: every vertex of the lower convex hull of achievable (cost, error), cheapest first.

    Each vertex is optimal for its cost (no allocation of that size or less has less error) and is
    the argmin of Σ e + λ·Σ c for a range of λ.
    """
    opts = _options(costs, errors)
    hulls = [_layer_hull(o, c, e) for o, c, e in zip(opts, costs, errors)]
    segments = []  # (−slope, layer, position): slope = error removed per byte added
    for layer, hull in enumerate(hulls):
        for pos in range(1, len(hull)):
            a, b = hull[pos - 1], hull[pos]
            de = errors[layer][a] - errors[layer][b]  # type: ignore[operator]
            slope = de / (costs[layer][b] - costs[layer][a])  # type: ignore[operator]
            segments.append((-slope, layer, pos))
    segments.sort()
    choices = [h[0] for h in hulls]
    cost, error = _total(costs, errors, choices)
    front = [Solution(list(choices), cost, error, method="lagrangian", info={"slope": math.inf})]
    for neg_slope, layer, pos in segments:
        a, b = hulls[layer][pos - 1], hulls[layer][pos]
        choices[layer] = b
        cost += int(costs[layer][b]) - int(costs[layer][a])  # type: ignore[arg-type]
        error += float(errors[layer][b]) - float(errors[layer][a])  # type: ignore[arg-type]
        front.append(Solution(list(choices), cost, error, method="lagrangian", info={"slope": -neg_slope}))
    for s in front:  # exact sums (the running ones drift in the last bits)
        s.cost, s.error = _total(costs, errors, s.choices)
    return front


def lagrangian_bound(front: list[Solution], budget: int) -> float | None:
    """Lower bound on the least error within ``budget``: the hull interpolated at the budget."""
    if not front or budget < front[0].cost:
        return None
    for s, t in zip(front, front[1:]):
        if s.cost <= budget < t.cost:
            return s.error - (s.error - t.error) * (budget - s.cost) / (t.cost - s.cost)
    return front[-1].error


def _dp(costs: list[list[int | None]], errors: Table, opts: list[list[int]], cap_cost: int,
        max_cells: int) -> tuple[torch.Tensor, list[torch.Tensor], list[list[int]], int, bool]:
    """DP over extra cost units: (dp [cells+1] float64, back-pointers per layer, unit costs, unit, exact)."""
    base = [min(int(costs[i][k]) for k in o) for i, o in enumerate(opts)]  # type: ignore[arg-type]
    extras = [[int(costs[i][k]) - base[i] for k in o] for i, o in enumerate(opts)]  # type: ignore[arg-type]
    span = max(0, min(cap_cost - sum(base), sum(max(x) for x in extras)))
    unit = reduce(math.gcd, (x for row in extras for x in row if x), 0) or 1
    exact = True
    if span // unit > max_cells:
        unit = -(-span // max_cells)  # coarser unit; costs rounded up below, so solutions stay feasible
        exact = False
    cells = span // unit
    units = [[-(-x // unit) for x in row] for row in extras]
    dp = torch.full((cells + 1,), math.inf, dtype=torch.float64)
    dp[0] = 0.0
    back: list[torch.Tensor] = []
    index_dtype = torch.int8 if max(len(o) for o in opts) < 128 else torch.int16
    for i, o in enumerate(opts):
        new = torch.full_like(dp, math.inf)
        arg = torch.zeros(cells + 1, dtype=index_dtype)
        for j, k in enumerate(o):
            u = units[i][j]
            if u > cells:
                continue
            shifted = torch.full_like(dp, math.inf)
            shifted[u:] = dp[: cells + 1 - u] + float(errors[i][k])  # type: ignore[arg-type]
            better = shifted < new
            new = torch.where(better, shifted, new)
            arg = torch.where(better, torch.tensor(j, dtype=index_dtype), arg)
        dp = new
        back.append(arg)
    return dp, back, units, unit, exact


def _backtrack(dp_end: int, back: list[torch.Tensor], units: list[list[int]], opts: list[list[int]]) -> list[int]:
    choices = [0] * len(opts)
    cell = dp_end
    for i in range(len(opts) - 1, -1, -1):
        j = int(back[i][cell])
        choices[i] = opts[i][j]
        cell -= units[i][j]
    return choices


def _repair(costs: list[list[int | None]], errors: Table, opts: list[list[int]], choices: list[int],
            budget: int) -> list[int]:
    """Spend the slack: repeatedly apply the single-layer change that removes the most error and fits."""
    choices = list(choices)
    cost, _ = _total(costs, errors, choices)
    while True:
        best = None
        for i, o in enumerate(opts):
            ci, ei = costs[i][choices[i]], errors[i][choices[i]]
            for k in o:
                dc = int(costs[i][k]) - int(ci)  # type: ignore[arg-type]
                de = float(errors[i][k]) - float(ei)  # type: ignore[arg-type]
                if de < 0 and cost + dc <= budget and (best is None or de < best[0]):
                    best = (de, dc, i, k)
        if best is None:
            return choices
        _, dc, i, k = best
        choices[i], cost = k, cost + dc


def solve_budget(costs: list[list[int | None]], errors: Table, budget: int, *,
                 max_cells: int = MAX_CELLS) -> Solution:
    """Least Σ error with Σ cost ≤ ``budget`` (bytes). InvalidSpecError when even the cheapest plan is larger."""
    opts = _options(costs, errors)
    cheapest = sum(min(int(costs[i][k]) for k in o) for i, o in enumerate(opts))  # type: ignore[arg-type]
    if budget < cheapest:
        raise InvalidSpecError(f"the budget ({budget} bytes for the quantized layers) is below the smallest plan "
                               f"({cheapest} bytes, every layer at its smallest candidate)")
    front = pareto_hull(costs, errors)
    bound = lagrangian_bound(front, budget)
    dp, back, units, unit, exact = _dp(costs, errors, opts, budget, max_cells)
    end = int(torch.argmin(dp))  # first minimum: the cheapest of equally good plans
    choices = _backtrack(end, back, units, opts)
    if not exact:
        choices = _repair(costs, errors, opts, choices, budget)
    best_hull = [s for s in front if s.cost <= budget][-1]  # the front is cost-ascending, error-descending
    cost, error = _total(costs, errors, choices)
    method = "dp" if exact else f"dp(unit={unit} B)+repair"
    if best_hull.error < error:  # only possible when the DP was coarse
        choices, cost, error, method = list(best_hull.choices), best_hull.cost, best_hull.error, "lagrangian"
    return Solution(choices, cost, error, exact=exact, lower_bound=bound, method=method,
                    info={"unit_bytes": unit, "cells": int(dp.numel())})


def solve_error_bound(costs: list[list[int | None]], errors: Table, max_error: float, *,
                      max_cells: int = MAX_CELLS) -> Solution:
    """Least Σ cost with Σ error ≤ ``max_error``. InvalidSpecError when even the best plan exceeds the bound."""
    opts = _options(costs, errors)
    best = sum(min(float(errors[i][k]) for k in o) for i, o in enumerate(opts))  # type: ignore[arg-type]
    max_error = max_error + 1e-12 * abs(max_error)  # sums in another order differ in the last bits
    if best > max_error:
        raise InvalidSpecError(f"the error bound {max_error:g} is below the least predicted error of any plan "
                               f"({best:g}, every layer at its most accurate candidate)")
    dp, back, units, unit, exact = _dp(costs, errors, opts, sum(max(int(c) for c in row if c is not None)
                                                                 for row in costs), max_cells)
    ok = torch.nonzero(dp <= max_error)
    end = int(ok[0]) if ok.numel() else int(torch.argmin(dp))
    choices = _backtrack(end, back, units, opts)
    cost, error = _total(costs, errors, choices)
    if error > max_error:  # float round-off between the DP's sums and the exact sum: take the best plan
        choices = [min(o, key=lambda k, i=i: (errors[i][k], costs[i][k])) for i, o in enumerate(opts)]
        cost, error = _total(costs, errors, choices)
    return Solution(choices, cost, error, exact=exact, method="dp" if exact else f"dp(unit={unit} B)",
                    info={"unit_bytes": unit, "cells": int(dp.numel())})


def thin(front: list[Solution], max_points: int) -> list[Solution]:
    """At most ``max_points`` hull vertices, evenly spread in cost, both ends kept."""
    if len(front) <= max_points:
        return front
    lo, hi = front[0].cost, front[-1].cost
    picked, j = [], 0
    for t in range(max_points):
        target = lo + (hi - lo) * t / (max_points - 1)
        while j < len(front) - 1 and front[j + 1].cost <= target:
            j += 1
        if not picked or picked[-1] is not front[j]:
            picked.append(front[j])
    if picked[-1] is not front[-1]:
        picked.append(front[-1])
    return picked
