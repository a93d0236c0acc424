"""Session state through the object store vs as JSON over HTTP: per-fetch time of a 32k-token state.

The state is a :class:`~inferpool.sequences.SessionState` built directly (no engine):
32,768 tokens in one :class:`~inferpool.sequences.SequenceNode` (``1x32k``), and the
same tokens as 8 nodes of 4,096 (``8x4k``). Each node looks like a multi-turn RL
trajectory: alternating prompt and sampled segments, int64 token ids, bool
``trainable``, float64 logprobs (the engine's own where sampled, 1.0 elsewhere),
per-token weight versions (None on prompt tokens) and ~4 characters of text per token.

Two ways a trainer worker gets that state, each timed per fetch, from this driver and
from another Ray task (a trainer worker, the realistic consumer of ``state_ref()``):

- ``ref``: an actor holds the state (as the SessionStore does) and the caller runs
  ``ray.get(actor.get_state.remote())``: the actor serializes it into the object store
  (numpy arrays as out-of-band buffers), the caller maps it back zero-copy.
- ``json``: an aiohttp server on 127.0.0.1, in a subprocess of its own, answers each GET
  with ``json.dumps(state.to_dict())`` (serialized per request, as the actor does); the
  caller reads the body over a kept-alive ``http.client`` connection and ``json.loads``
  it.

For reference, ``ref_cached``: the actor puts the state once and returns that ObjectRef
(``ray.get`` twice), which is what a store that kept one ref per unchanged state would
serve; it shows how much of ``ref`` is the per-call serialization into the store.

Figures are per-fetch medians in milliseconds; ``json_over_ref`` is the ratio of the
medians, measured side by side in one run, the paths taking turns in rounds (goal >= 20
on the 1x32k state, driver and task). ``encode``/``decode`` break the JSON side down
(to_dict + dumps, loads) as measured in this driver, with no HTTP in between.

Run: python -m inferpool.bench.state_ref_vs_json [--quick] [--json PATH]
"""

from __future__ import annotations

import http.client
import json
import multiprocessing as mp
import pickle
import socket
import statistics
import time
from typing import Any

from inferpool.bench.common import Stopwatch, ensure_ray, goal, ratio, result

RATIO_GOAL = 20.0
TOTAL_TOKENS = 32_768
LAYOUTS: dict[str, tuple[int, int]] = {"1x32k": (1, 32_768), "8x4k": (8, 4_096)}
"""Layout name -> (nodes, tokens per node)."""
GOAL_LAYOUT = "1x32k"
VOCAB = 151_936  # a Qwen-sized vocabulary: token ids as a real model's look
SEGMENT_TOKENS = (64, 1024)  # prompt / sampled segment lengths are drawn from this range

# size -> (fetches per path, warm-up fetches per path, rounds)
SIZES: dict[str, tuple[int, int, int]] = {
    "full": (200, 10, 4),
    "quick": (12, 1, 2),
    "tiny": (4, 1, 1),
}

_WORDS = (
    "the model calls a tool and reads its output then answers with a short plan step by step "
    "reward policy rollout token sample value result error file data search query page score"
).split()


def build_node(tokens: int, seed: int) -> Any:
    """One trajectory node of ``tokens`` tokens: alternating prompt and sampled segments."""
    import numpy as np

    from inferpool.sequences import PROMPT_LOGPROB, SequenceNode

    rng = np.random.default_rng(seed)
    token_array = rng.integers(0, VOCAB, size=tokens, dtype=np.int64)
    trainable = np.zeros(tokens, dtype=bool)
    versions: list[Any] = [None] * tokens
    pos, sampled, turn = 0, False, 0
    while pos < tokens:
        end = min(tokens, pos + int(rng.integers(*SEGMENT_TOKENS)))
        if sampled:
            trainable[pos:end] = True
            versions[pos:end] = [turn] * (end - pos)
            turn += 1
        pos, sampled = end, not sampled
    logprobs = np.where(trainable, np.log(rng.uniform(0.05, 1.0, size=tokens)), PROMPT_LOGPROB)
    words = rng.choice(len(_WORDS), size=tokens)
    text = " ".join(_WORDS[i] for i in words)  # ~4 characters per token, like real text
    return SequenceNode(
        node_id=f"n{seed}",
        token_array=token_array,
        trainable=trainable,
        logprob_array=logprobs.astype(np.float64),
        full_text=text,
        weight_versions=versions,
        metadata={"finish_reason": "length", "turns": turn, "engine_id": "e0"},
        parent_id=None,
    )


def build_state(nodes: int, tokens_per_node: int, seed: int = 0) -> Any:
    """A SessionState of ``nodes`` nodes of ``tokens_per_node`` tokens (deterministic)."""
    from inferpool.sequences import SessionState

    return SessionState(
        session_id=f"{seed:032x}",
        nodes=[build_node(tokens_per_node, seed * 1000 + k) for k in range(nodes)],
        track_tree=nodes > 1,
        turns=4,
    )


def state_tokens(state: Any) -> int:
    return sum(len(n) for n in state.nodes)


def dict_tokens(d: dict[str, Any]) -> int:
    return sum(len(n["tokens"]) for n in d["nodes"])


# -- the JSON server (a subprocess) ----------------------------------------------------------
def _serve_json(states: dict[str, Any], sock: socket.socket, ready: Any) -> None:
    """aiohttp on an already-bound socket: GET /state/<layout> -> json.dumps(state.to_dict())."""
    import asyncio

    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        body = json.dumps(states[request.match_info["layout"]].to_dict()).encode()
        return web.Response(body=body, content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/state/{layout}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        ready.set()
        await asyncio.Event().wait()  # served until the parent terminates this process

    asyncio.run(main())


class JsonServer:
    """The JSON server in its own process (spawned: no state inherited from Ray's threads)."""

    def __init__(self, states: dict[str, Any]) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        self._proc = ctx.Process(target=_serve_json, args=(states, self._sock, ready), daemon=True)
        self._proc.start()
        if not ready.wait(60):
            self.stop()
            raise RuntimeError("the JSON server did not start in 60 s")

    def stop(self) -> None:
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join(10)
        self._sock.close()


def fetch_json(conn: http.client.HTTPConnection, layout: str) -> dict[str, Any]:
    """One GET over a kept-alive connection, parsed back with json.loads."""
    conn.request("GET", f"/state/{layout}")
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"JSON server answered {resp.status}: {body[:200]!r}")
    out: dict[str, Any] = json.loads(body)
    return out


def time_json(port: int, layout: str, fetches: int, warmup: int) -> list[float]:
    """Seconds of each of ``fetches`` JSON fetches (after ``warmup`` untimed ones)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        samples = []
        for i in range(warmup + fetches):
            t0 = time.perf_counter()
            fetch_json(conn, layout)
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
        return samples
    finally:
        conn.close()


def time_ref(holder: Any, layout: str, fetches: int, warmup: int, cached: bool = False) -> list[float]:
    """Seconds of each of ``fetches`` ``ray.get(holder.get_state.remote())`` (after warm-up).

    ``cached``: the holder returns an ObjectRef it put once (``ray.get`` twice), instead of
    returning the state itself (serialized into the object store on every call)."""
    import ray

    samples = []
    for i in range(warmup + fetches):
        t0 = time.perf_counter()
        if cached:
            ray.get(ray.get(holder.get_state_ref.remote(layout)))
        else:
            ray.get(holder.get_state.remote(layout))
        if i >= warmup:
            samples.append(time.perf_counter() - t0)
    return samples


# -- Ray side ---------------------------------------------------------------------------------
class StateHolder:
    """Holds the states like the SessionStore does and returns one per call."""

    def __init__(self, states: dict[str, Any]) -> None:
        self.states = states
        self.refs: dict[str, Any] = {}

    async def get_state(self, layout: str) -> Any:
        return self.states[layout]

    async def get_state_ref(self, layout: str) -> Any:
        """An ObjectRef to the state, put once (a store could keep one per unchanged state)."""
        import ray

        if layout not in self.refs:
            self.refs[layout] = ray.put(self.states[layout])
        return self.refs[layout]


def _task_time_ref(holder: Any, layout: str, fetches: int, warmup: int, cached: bool) -> list[float]:
    return time_ref(holder, layout, fetches, warmup, cached)


def _task_time_json(port: int, layout: str, fetches: int, warmup: int) -> list[float]:
    return time_json(port, layout, fetches, warmup)


def _check(holder: Any, port: int, states: dict[str, Any]) -> None:
    """Both paths deliver the whole state (outside the timings)."""
    import ray

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for layout, state in states.items():
            via_ref = ray.get(holder.get_state.remote(layout))
            via_json = fetch_json(conn, layout)
            want = state_tokens(state)
            if state_tokens(via_ref) != want or dict_tokens(via_json) != want:
                raise RuntimeError(f"{layout}: a path lost tokens")
            if via_json["nodes"][0]["tokens"][:8] != via_ref.nodes[0].token_array[:8].tolist():
                raise RuntimeError(f"{layout}: the paths disagree")
    finally:
        conn.close()


def _encode_decode(state: Any, repeats: int) -> tuple[float, float, int]:
    """Median seconds of to_dict + dumps and of loads in this process, and the JSON size."""
    enc, dec = [], []
    body = b""
    for _ in range(repeats):
        with Stopwatch() as sw:
            body = json.dumps(state.to_dict()).encode()
        enc.append(sw.seconds)
        with Stopwatch() as sw:
            json.loads(body)
        dec.append(sw.seconds)
    return statistics.median(enc), statistics.median(dec), len(body)


def _measure(holder: Any, port: int, fetches: int, warmup: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per layout and path, the per-fetch samples; paths alternate over ``rounds`` rounds."""
    import ray

    ref_task = ray.remote(num_cpus=0)(_task_time_ref)
    json_task = ray.remote(num_cpus=0)(_task_time_json)
    per_round = max(1, fetches // rounds)
    paths = {
        "ref_driver": lambda layout: time_ref(holder, layout, per_round, warmup),
        "json_driver": lambda layout: time_json(port, layout, per_round, warmup),
        "ref_task": lambda layout: ray.get(ref_task.remote(holder, layout, per_round, warmup, False)),
        "json_task": lambda layout: ray.get(json_task.remote(port, layout, per_round, warmup)),
        "ref_cached_driver": lambda layout: time_ref(holder, layout, per_round, warmup, cached=True),
        "ref_cached_task": lambda layout: ray.get(ref_task.remote(holder, layout, per_round, warmup, True)),
    }
    names = list(paths)
    samples: dict[str, dict[str, list[float]]] = {layout: {n: [] for n in names} for layout in LAYOUTS}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for layout in LAYOUTS:
            for name in order:
                samples[layout][name].extend(paths[name](layout))
    return samples


def run(quick: bool = False, tiny: bool = False) -> dict[str, Any]:
    """Per-fetch time of each path and layout, and the json/ref ratios."""
    import ray

    size = "tiny" if tiny else "quick" if quick else "full"
    fetches, warmup, rounds = SIZES[size]
    states = {layout: build_state(nodes, per_node) for layout, (nodes, per_node) in LAYOUTS.items()}
    assert all(state_tokens(s) == TOTAL_TOKENS for s in states.values())
    ensure_ray()
    holder: Any = ray.remote(StateHolder).options(num_cpus=0, max_concurrency=1000).remote(states)
    server = JsonServer(states)
    try:
        _check(holder, server.port, states)
        samples = _measure(holder, server.port, fetches, warmup, rounds)
    finally:
        server.stop()
        ray.kill(holder)

    figures: dict[str, float] = {}
    goals = []
    for layout, state in states.items():
        s = samples[layout]
        for name, values in s.items():
            figures[f"{layout}_{name}_ms"] = 1000 * statistics.median(values)
        for where in ("driver", "task"):
            figures[f"{layout}_json_over_ref_{where}"] = ratio(
                figures[f"{layout}_json_{where}_ms"], figures[f"{layout}_ref_{where}_ms"]
            )
        for where in ("driver", "task"):
            figures[f"{layout}_json_over_ref_cached_{where}"] = ratio(
                figures[f"{layout}_json_{where}_ms"], figures[f"{layout}_ref_cached_{where}_ms"]
            )
        enc, dec, json_bytes = _encode_decode(state, 3 if tiny else 5 if quick else 10)
        figures[f"{layout}_json_encode_ms"] = 1000 * enc
        figures[f"{layout}_json_decode_ms"] = 1000 * dec
        figures[f"{layout}_json_bytes"] = json_bytes
        figures[f"{layout}_pickle_bytes"] = len(pickle.dumps(state, protocol=5))
        if layout == GOAL_LAYOUT:
            for where in ("driver", "task"):
                name = f"{layout} json / ref per-fetch time ({where})"
                goals.append(goal(name, figures[f"{layout}_json_over_ref_{where}"], ">=", RATIO_GOAL))
    params = {
        "tokens": TOTAL_TOKENS,
        "layouts": {k: f"{n} node(s) x {t} tokens" for k, (n, t) in LAYOUTS.items()},
        "fetches_per_path": max(1, fetches // rounds) * rounds,
        "warmup_per_round": warmup,
        "rounds": rounds,
    }
    notes = [
        "figures are per-fetch medians in milliseconds; ratios use the medians",
        "ref: ray.get(actor.get_state.remote()); the actor re-serializes the state on each call, "
        "as the SessionStore does",
        "json: aiohttp server in its own process, json.dumps(state.to_dict()) per request, "
        "http.client keep-alive + json.loads in the caller",
        "task = a Ray task (num_cpus=0) doing the same fetches: a trainer worker fetching state_ref()",
        "ref_cached (reference, not in the goals): the holder returns an ObjectRef it put once, so a "
        "fetch skips the per-call serialization into the object store",
        "encode/decode: to_dict + dumps and loads alone, in the driver, no HTTP",
    ]
    return result("state_ref_vs_json", params, figures, goals, notes)


if __name__ == "__main__":
    import sys

    from inferpool.bench.runner import main as _main
    from inferpool.bench.runner import register

    register("state_ref_vs_json", "inferpool.bench.state_ref_vs_json")
    raise SystemExit(_main(["--only", "state_ref_vs_json", *sys.argv[1:]]))
