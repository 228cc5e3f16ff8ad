"""Multi-tenant chat on Ray Serve: 64 concepts in one load vs no concepts; cold vs warm concept latency.

    python -m bench.serve_multitenant [--small] [--requests 128] [--rounds 4] [--concurrency 32] [--max-tokens 64]

One run, side by side, against the app on a local Ray with concepts in an
S3-compatible server on loopback (moto's server, or --s3-endpoint):

1. throughput: the same requests (same texts, same max_tokens, greedy) once
   naming 64 distinct concepts of 8 tenants (`<cN>` resolves) and once with
   no concepts (`cN` plain), in rounds of both modes with the order alternating
   (the ratio is the median over rounds, robust to other load on the machine);
2. latency of a request whose concept is not cached yet (loaded from S3)
   versus the same request right after (cached), one request at a time.

The last line printed is one JSON object:
{"ratio": tokens/s with concepts ÷ without, "cold_p50_ms": …, "warm_p50_ms": …, "cold_p95_ms": …, …}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx

DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
ROOT = Path(__file__).resolve().parents[1]


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.serve_multitenant", description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a quick run (the test suite's)")
    p.add_argument("--concepts", type=int, default=64)
    p.add_argument("--tenants", type=int, default=8)
    p.add_argument("--latents", type=int, default=16, help="k latent tokens per concept")
    p.add_argument("--requests", type=int, default=128, help="requests per mode per round")
    p.add_argument("--rounds", type=int, default=4, help="rounds, each running both modes (order alternating)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64, help="per request (greedy; may stop earlier)")
    p.add_argument("--cold", type=int, default=30, help="cold/warm request pairs")
    p.add_argument("--revalidate-s", type=float, default=1.0, help="the app's revalidate_s")
    p.add_argument("--s3-endpoint", default=os.environ.get("YOLLAVA_TEST_S3_ENDPOINT"))
    args = p.parse_args(argv)
    if args.small:
        args.concepts, args.requests, args.rounds, args.concurrency, args.cold = 8, 16, 1, 8, 4
        args.max_tokens = 4
    return args


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


async def run_load(url, keys, bodies, concurrency):
    """POST every (tenant, body) with `concurrency` in flight; returns (seconds, completion tokens)."""
    sem = asyncio.Semaphore(concurrency)
    tokens = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def one(tenant, body):
            nonlocal tokens
            async with sem:
                r = await client.post("/v1/chat/completions", json=body,
                                      headers={"Authorization": f"Bearer {keys[tenant]}"})
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(one(t, b) for t, b in bodies))
        return time.perf_counter() - t0, tokens


def body(text, max_tokens):
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0}


def main(argv=None) -> dict:
    args = parse(argv)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's access log
    for k, v in DUMMY_AWS.items():
        os.environ.setdefault(k, v)
    server = None
    endpoint = args.s3_endpoint
    if not endpoint:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        endpoint = "http://%s:%d" % server.get_host_and_port()
    import boto3

    from cluster.store import open_store
    from serve.app import AppArgs
    from serve.keys import create_key
    from serve.local import start
    from yollava.artifacts import ConceptArtifact
    from yollava.backbone import load_backbone
    from yollava.concept_model import ConceptRows
    from yollava.tokens import ConceptTokens

    import torch

    bucket = f"yollava-bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/bench"
    store = open_store(uri, endpoint_url=endpoint)
    bb = load_backbone("tiny")
    g = torch.Generator().manual_seed(0)
    std_e, std_h = bb.embed_tokens.weight.std().item(), bb.lm_head.weight.std().item()

    def put(owner, name):
        k, d = args.latents, bb.hidden_size
        rows = ConceptRows(ConceptTokens(name, k), torch.randn(k + 1, d, generator=g) * std_e,
                           torch.randn(k + 1, d, generator=g) * std_h)
        store.put_concept(ConceptArtifact(owner, rows, "tiny", bb.fingerprint))

    tenants = [f"t{i}" for i in range(args.tenants)]
    concepts = [(tenants[i % len(tenants)], f"c{i}") for i in range(args.concepts)]
    cold = [(tenants[i % len(tenants)], f"cold{i}") for i in range(args.cold)]
    for owner, name in concepts + cold:
        put(owner, name)
    keys_file = Path(tempfile.mkdtemp(prefix="bench-keys-")) / "keys.json"
    keys = {t: create_key(keys_file, t) for t in tenants}

    app = start(AppArgs(store=uri, keys=str(keys_file), model="tiny", s3_endpoint_url=endpoint,
                        max_batch_size=args.concurrency, batch_wait_ms=5,
                        revalidate_s=args.revalidate_s,
                        limits={"max_concepts": 8}),
                env={"PYTHONPATH": str(ROOT), **{k: os.environ[k] for k in DUMMY_AWS}},
                log_to_driver=False)
    try:
        with_c = [(o, body(f"Tell me about <{n}> in the photo.", args.max_tokens))
                  for o, n in (concepts[i % len(concepts)] for i in range(args.requests))]
        plain = [(o, body(b["messages"][0]["content"].replace("<", "").replace(">", ""), args.max_tokens))
                 for o, b in with_c]
        # warm up: every concept cached, the model's first passes done
        asyncio.run(run_load(app.url, keys, with_c[:args.concepts] + plain[:args.concurrency],
                             args.concurrency))
        # Rounds alternate the order (AB, BA, ...) so drift in the machine's load hits both modes;
        # the ratio is the median of the per-round ratios.
        totals = {"concepts": [0.0, 0, 0], "plain": [0.0, 0, 0]}
        per_round = []
        for r in range(args.rounds):
            tps = {}
            modes = (("concepts", with_c), ("plain", plain))
            for mode, load in modes if r % 2 == 0 else modes[::-1]:
                secs, toks = asyncio.run(run_load(app.url, keys, load, args.concurrency))
                t = totals[mode]
                t[0], t[1], t[2] = t[0] + secs, t[1] + toks, t[2] + len(load)
                tps[mode] = (toks / secs, len(load) / secs)
            per_round.append((tps["concepts"][0] / tps["plain"][0], tps["concepts"][1] / tps["plain"][1]))
            print(f"round {r + 1}: tokens/s ratio {per_round[-1][0]:.3f}, requests/s ratio {per_round[-1][1]:.3f}")
        figures = {}
        for mode, (secs, toks, n) in totals.items():
            figures[f"{mode}_rps"] = n / secs
            figures[f"{mode}_tokens_per_s"] = toks / secs
            print(f"{mode:>8}: {n} requests in {secs:.2f} s: {n / secs:.1f} req/s, {toks / secs:.1f} tokens/s "
                  f"({args.concurrency} concurrent, max_tokens {args.max_tokens})")
        ratio = statistics.median(r[0] for r in per_round)
        rps_ratio = statistics.median(r[1] for r in per_round)
        print(f"ratio with/without concepts (median of rounds): tokens/s {ratio:.3f}, requests/s {rps_ratio:.3f}")

        cold_ms, warm_ms = [], []
        with httpx.Client(base_url=app.url, timeout=60) as client:
            def timed(owner, name):
                t0 = time.perf_counter()
                r = client.post("/v1/chat/completions", json=body(f"Who is <{name}>?", 4),
                                headers={"Authorization": f"Bearer {keys[owner]}"})
                r.raise_for_status()
                assert r.headers["x-concepts-used"] == f"<{name}>"
                return (time.perf_counter() - t0) * 1000

            for owner, name in cold:
                cold_ms.append(timed(owner, name))
                warm_ms.append(timed(owner, name))
        lat = {"cold_p50_ms": statistics.median(cold_ms), "warm_p50_ms": statistics.median(warm_ms),
               "cold_p95_ms": pct(cold_ms, 95), "warm_p95_ms": pct(warm_ms, 95)}
        print(f"first use (loaded from S3): p50 {lat['cold_p50_ms']:.1f} ms, p95 {lat['cold_p95_ms']:.1f} ms; "
              f"cached: p50 {lat['warm_p50_ms']:.1f} ms, p95 {lat['warm_p95_ms']:.1f} ms; "
              f"cold-load overhead p50 {lat['cold_p50_ms'] - lat['warm_p50_ms']:.1f} ms")
    finally:
        app.stop()
        if server is not None:
            server.stop()
    result = {"ratio": round(ratio, 4), **{k: round(v, 2) for k, v in lat.items()},
              "rps_ratio": round(rps_ratio, 4),
              "cold_overhead_p50_ms": round(lat["cold_p50_ms"] - lat["warm_p50_ms"], 2),
              **{k: round(v, 2) for k, v in figures.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
