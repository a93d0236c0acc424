"""The ``inferpool`` CLI main job on fake engines (the README's main job uses vLLM).

Run: pytest tests/unit/test_cli.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inferpool.cli import main


def test_rollout_writes_token_exact_trajectories(
    ray_session: None, tiny_tokenizer_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "traj.jsonl"
    code = main(
        [
            "rollout",
            "--backend",
            "fake",
            "--model",
            tiny_tokenizer_path,
            "--num-rollouts",
            "4",
            "--turns",
            "2",
            "--n",
            "2",
            "--max-tokens",
            "5",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["rollout"] for r in rows} == {0, 1, 2, 3}
    assert len(rows) == 4 * 2  # n=2 first-turn branches; the second turn replaces its parent
    for r in rows:
        assert len(r["tokens"]) == len(r["masked_tokens"]) == len(r["logprobs"]) == len(r["weight_versions"])
        trainable = [m for m in r["masked_tokens"] if m != -100]
        assert len(trainable) > 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sequences"] == len(rows) and summary["generated_tokens"] > 0


def test_bad_argument_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["rollout", "--num-rollouts", "zero"])
