"""Serve autoscaling of engine replicas on the engines' own in-flight requests.

Generation traffic does not flow through Serve: callers (the HTTP ingress, rollout
workers using the Python Pool, session stores) lease a slot from the router and call
the engine actor directly, so Serve's built-in signal (requests ongoing at a replica)
would read zero. Instead each engine replica reports its engine's in-flight requests
as a custom autoscaling metric (``record_autoscaling_stats``), and
:func:`engine_in_flight_policy` sizes the deployment so that every engine holds about
``target_ongoing_requests`` requests. Serve applies ``min_replicas`` /
``max_replicas``, the up/down-scaling delays and factors around the policy.

This module is pickled by value into Serve's controller: keep it free of imports
beyond the standard library.
"""

from __future__ import annotations

from typing import Any

#: Name of the custom metric each engine replica reports.
METRIC = "inferpool_engine_in_flight"
#: Import path of the policy, for ``autoscaling_config.policy.policy_function``.
POLICY_PATH = "inferpool.deploy.autoscaling:engine_in_flight_policy"


def engine_in_flight_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Desired replicas = total engine in-flight requests / target in-flight per engine.

    ``ctx`` is Serve's ``AutoscalingContext``; ``aggregated_metrics[METRIC]`` maps each
    running replica to its in-flight count averaged over ``look_back_period_s``. Before
    any replica has reported, the current target stands.
    """
    per_replica = (ctx.aggregated_metrics or {}).get(METRIC) or {}
    if not per_replica:
        return ctx.target_num_replicas, {}
    target = ctx.config.get_target_ongoing_requests()
    total = float(sum(per_replica.values()))
    return total / target, {}


def engine_autoscaling_config(
    min_replicas: int = 1,
    max_replicas: int = 4,
    target_ongoing_requests: float = 64.0,
    upscale_delay_s: float = 30.0,
    downscale_delay_s: float = 300.0,
    look_back_period_s: float = 30.0,
    metrics_interval_s: float = 10.0,
    **extra: Any,
) -> dict[str, Any]:
    """A Serve ``autoscaling_config`` for the engine deployment, with the in-flight policy.

    ``target_ongoing_requests`` is the in-flight requests one engine should hold;
    ``metrics_interval_s`` is how often replicas push the metric to the controller.
    """
    return {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "target_ongoing_requests": target_ongoing_requests,
        "upscale_delay_s": upscale_delay_s,
        "downscale_delay_s": downscale_delay_s,
        "look_back_period_s": look_back_period_s,
        "metrics_interval_s": metrics_interval_s,
        "policy": {"policy_function": POLICY_PATH},
        **extra,
    }
