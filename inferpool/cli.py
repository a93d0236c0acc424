"""The ``inferpool`` command line: rollout, serve, status, bench."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from inferpool.errors import InferpoolError
from inferpool.log import setup_logging


def _rollout(args: argparse.Namespace) -> int:
    from inferpool.rollout import RolloutConfig, run_rollouts

    cfg = RolloutConfig(
        model=args.model,
        backend=args.backend,
        engines=args.engines,
        num_rollouts=args.num_rollouts,
        n=args.n,
        turns=args.turns,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        output=args.output,
        progress=not args.no_progress,
    )
    summary = run_rollouts(cfg)
    print(
        f"{summary['sequences']} sequences from {summary['rollouts']} rollouts x {summary['turns']} turns: "
        f"{summary['generated_tokens']} tokens in {summary['seconds']}s = "
        f"{summary['generated_tokens_per_s']} generated tokens/s -> {summary['output']}"
    )
    print(json.dumps(summary))
    return 0


def _status(args: argparse.Namespace) -> int:
    from inferpool.pool import Pool

    pool = Pool.connect(args.name, namespace=args.namespace)
    stats = pool.stats()
    if args.json:
        print(json.dumps(stats, default=str, indent=2))
        return 0
    router = stats["router"]
    shards = router.get("shards") or [router]
    where = ", ".join(_where(r) for r in shards)
    routers = f"router on {where}" if len(shards) == 1 else f"{len(shards)} router shards on {where}"
    print(f"pool {stats['pool']}: policy {router['policy']}, {router['leases']} leases, {routers}")
    for eid, e in sorted(stats["engines"].items()):
        print(
            f"  {eid}: {'healthy' if e.get('healthy') else 'UNHEALTHY'} on {_where(e)} "
            f"in_flight={e.get('in_flight')} served={e.get('served')} failed={e.get('failed')} "
            f"tokens={e.get('generated_tokens')} {e.get('error', '')}".rstrip()
        )
    for shard, entry in sorted(stats.get("sessions", {}).items()):
        counts = {k: v for k, v in entry.items() if k not in _PLACE_KEYS}
        print(f"  sessions[{shard}] on {_where(entry)}: {counts}")
    return 0


_PLACE_KEYS = ("node_id", "actor_state", "restarts")


def _where(entry: dict[str, object]) -> str:
    """``node <id>`` of a stats entry, with the actor's state when it is not ALIVE."""
    node = str(entry.get("node_id") or "?")
    state = entry.get("actor_state")
    return f"node {node}" + (f" ({state})" if state and state != "ALIVE" else "")


def _bench(args: argparse.Namespace) -> int:
    """Run the benchmarks (:mod:`inferpool.bench`)."""
    from inferpool.bench.runner import main as bench_main

    argv: list[str] = []
    if args.quick:
        argv.append("--quick")
    if args.only:
        argv += ["--only", args.only]
    if args.json:
        argv += ["--json", args.json]
    if args.list:
        argv.append("--list")
    return int(bench_main(argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferpool", description=__doc__)
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (env INFERPOOL_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", required=True)

    ro = sub.add_parser("rollout", help="run rollouts through a pool and write trajectories")
    ro.add_argument("--model", default=None, help="HF id or local path (default: the embedded tiny model)")
    ro.add_argument("--backend", default="vllm", help="engine backend (vllm, fake, ...)")
    ro.add_argument("--engines", type=int, default=1, help="engine replicas")
    ro.add_argument("--num-rollouts", type=int, default=64)
    ro.add_argument("--n", type=int, default=2, help="samples per prompt")
    ro.add_argument("--turns", type=int, default=2, help="assistant turns per rollout")
    ro.add_argument("--max-tokens", type=int, default=32)
    ro.add_argument("--temperature", type=float, default=1.0)
    ro.add_argument("--seed", type=int, default=0)
    ro.add_argument("--output", default="rollouts.jsonl", help=".jsonl or .parquet")
    ro.add_argument("--no-progress", action="store_true")
    ro.set_defaults(func=_rollout)

    st = sub.add_parser("status", help="engines, health, load, sessions of a running pool")
    st.add_argument("--name", default="default")
    st.add_argument("--namespace", default="inferpool")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)

    be = sub.add_parser("bench", help="the benchmarks in bench/, printed as side-by-side ratios")
    be.add_argument("--quick", action="store_true", help="a short run (under 2 minutes on 2 cores)")
    be.add_argument("--only", default=None, help="comma-separated benchmark names")
    be.add_argument("--json", default=None, help="also write the figures to this JSON file")
    be.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    be.set_defaults(func=_bench)

    from inferpool.deploy.cli import add_serve_parser

    add_serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except InferpoolError as exc:
        print(f"inferpool: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
