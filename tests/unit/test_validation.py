"""Configs and requests refuse bad values with our typed errors, naming the field: at
construction, on assignment, and across fields (no Ray needed).

Run: pytest tests/unit/test_validation.py
"""

from __future__ import annotations

import math

import pytest

import inferpool as ip
from inferpool.validation import check_request


def test_an_eval_quota_that_leaves_no_train_slot_is_refused() -> None:
    with pytest.raises(ip.ConfigError, match=r"eval_requests_per_engine.*max_requests_per_engine") as err:
        ip.RouterConfig(max_requests_per_engine=8)  # default eval quota 64
    assert err.value.field == "eval_requests_per_engine"
    assert ip.RouterConfig(max_requests_per_engine=8, eval_requests_per_engine=2).max_requests_per_engine == 8
    assert ip.RouterConfig(max_requests_per_engine=8, eval_requests_per_engine=0).eval_requests_per_engine == 0


def test_the_quota_rule_holds_per_engine_group() -> None:
    with pytest.raises(ip.ConfigError, match=r"engines\[1\]\.eval_requests_per_engine"):
        ip.PoolConfig(
            engines=[
                ip.EngineConfig(backend="fake"),
                ip.EngineConfig(backend="fake", max_requests_per_engine=16),  # router quota 64
            ]
        )
    with pytest.raises(ip.ConfigError, match=r"engines\[0\]"):
        ip.PoolConfig(engines=[ip.EngineConfig(backend="fake", eval_requests_per_engine=600)])


def test_assignment_is_validated_with_our_error_and_leaves_the_value() -> None:
    sp = ip.SamplingParams()
    with pytest.raises(ip.RequestError) as err:
        sp.n = 0
    assert err.value.field == "n"
    assert sp.n == 1
    cfg = ip.RouterConfig()
    with pytest.raises(ip.ConfigError, match="eval_requests_per_engine"):
        cfg.max_requests_per_engine = 8
    assert cfg.max_requests_per_engine == 512
    cfg.eval_requests_per_engine = 2
    cfg.max_requests_per_engine = 8
    assert (cfg.max_requests_per_engine, cfg.eval_requests_per_engine) == (8, 2)


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", math.inf), ("presence_penalty", math.nan), ("frequency_penalty", -math.inf), ("top_p", math.nan)],
)
def test_non_finite_sampling_values_are_refused(field: str, value: float) -> None:
    with pytest.raises(ip.RequestError) as err:
        ip.SamplingParams(**{field: value})
    assert err.value.field == field


def test_request_checks_name_the_prompt_and_field() -> None:
    sp = ip.SamplingParams(stop_token_ids=[3, 99])
    with pytest.raises(ip.RequestError, match=r"prompts\[2\]\.sampling\.stop_token_ids\[1\]"):
        check_request([1, 2], sp, vocab=50, ctx=100, where="prompts[2].")
    with pytest.raises(ip.RequestError, match="no room"):
        check_request(list(range(10)), ip.SamplingParams(), vocab=50, ctx=10)
    with pytest.raises(ip.RequestError, match="list of token ids"):
        check_request("1 2 3", ip.SamplingParams(), vocab=50, ctx=10)
    import numpy as np

    assert check_request(np.array([1, 2], np.int64), ip.SamplingParams(), vocab=50, ctx=10) == [1, 2]
