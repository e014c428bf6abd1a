"""Literate demos: every identity of backprop through ``Y = X W + b``, checked on numbers.

Run them all with ``python -m demos`` (``--help`` for the options). Each demo module
has a ``run(ctx)`` that narrates, checks each claim against an independent reference
(hand-worked numbers, plain ``x @ W + b`` under JAX's own autodiff in float64, or finite
differences), and returns its list of checks.
"""
