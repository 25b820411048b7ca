"""Mixed-precision planning: measure each layer's error at candidate formats, pick one per layer under a budget.

``measure`` (output error + exact stored bytes per layer × candidate, cached as JSON) →
``sensitivity`` (per-layer weights that turn layer errors into model KL) → ``solve`` (multiple-choice
knapsack: exact DP + the Lagrangian Pareto hull) → ``recipe_out`` (a recipe ``lowbit quantize`` applies).
``planner`` strings them together; ``lowbit plan`` is the command line.
"""

from __future__ import annotations

from lowbit.plan.measure import DEFAULT_CANDIDATES, Measurement, parse_candidates, parse_spec_name
from lowbit.plan.planner import Plan, make_plan, measure_model, verify_plan
from lowbit.plan.recipe_out import plan_recipe, write_recipe
from lowbit.plan.solve import Solution, pareto_hull, solve_budget, solve_error_bound

__all__ = ["DEFAULT_CANDIDATES", "Measurement", "Plan", "Solution", "make_plan", "measure_model", "pareto_hull",
           "parse_candidates", "parse_spec_name", "plan_recipe", "solve_budget", "solve_error_bound", "verify_plan",
           "write_recipe"]
