"""Multi-tenant chat: continuous batching vs the static engine on a realistic load; a flood by
one tenant; 64 concepts in one load vs none; cold vs warm concept latency.

    python -m bench.serve_multitenant [--small] [--load-requests 384] [--rate 128] [--parts load,flood]

One run, side by side, concepts in an S3-compatible server on loopback (moto's
server, or --s3-endpoint), the tiny model, torch on --threads threads:

1. realistic load, in process (no HTTP, the same `ChatEngine` with either
   scheduler): 8 tenants, 64 concepts, Poisson arrivals at --rate requests/s,
   answer lengths drawn from 8 to 256 tokens (greedy; half the requests
   streamed), the same trace for the static engine (`bench.static_engine`, the
   service's engine before), static batches on the new decoder (what the
   scheduling alone is worth) and the continuous engine, in rotating order
   over rounds; all must give the same answers (checked). Throughput =
   completion tokens / (last answer - first arrival); latency = arrival to
   last token. Ratios are medians over rounds. The rate, 128/s, is about
   twice what the continuous engine answers and four times the static one's,
   so the figure is each engine's capacity: with arrivals slower than an
   engine its throughput is the arrival rate, and the ratio is bounded by when
   the last request arrives and how long its answer is;
2. flood, through the app on a local Ray (HTTP, the ingress's limits): one
   tenant sends 48 concurrent long answers (256 tokens), another sends short
   requests (16 tokens) one after another; that tenant's p50 latency during
   the flood vs alone, and every status of both (no 5xx);
3. the same requests once naming 64 distinct concepts of 8 tenants (`<cN>`
   resolves) and once with none (`cN` plain), through the app, rounds of both
   with the order alternating (ratio: median over rounds);
4. latency of a request whose concept is not cached yet (loaded from S3)
   versus the same request right after (cached), one at a time.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
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
    p.add_argument("--threads", type=int, default=1, help="torch threads (in process and in the model replica)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--load-requests", type=int, default=384, help="requests of the realistic load, per round")
    p.add_argument("--rate", type=float, default=128.0,
                   help="Poisson arrivals per second of the realistic load (128: more than either engine answers)")
    p.add_argument("--min-tokens", type=int, default=8)
    p.add_argument("--max-answer", type=int, default=256)
    p.add_argument("--load-rounds", type=int, default=3, help="rounds; the three arms rotate order")
    p.add_argument("--flood", type=int, default=48, help="concurrent long requests of the flooding tenant")
    p.add_argument("--quiet", type=int, default=12, help="requests of the quiet tenant, alone and under the flood")
    p.add_argument("--requests", type=int, default=128, help="concepts-vs-none: requests per mode per round")
    p.add_argument("--rounds", type=int, default=2, help="concepts-vs-none: rounds, each running both modes")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64, help="concepts-vs-none: per request")
    p.add_argument("--cold", type=int, default=30, help="cold/warm request pairs")
    p.add_argument("--revalidate-s", type=float, default=1.0, help="the app's revalidate_s")
    p.add_argument("--s3-endpoint", default=os.environ.get("YOLLAVA_TEST_S3_ENDPOINT"))
    p.add_argument("--parts", default="load,flood,concepts,cold", help="which of the four to run")
    args = p.parse_args(argv)
    args.parts = set(args.parts.split(","))
    if not args.parts <= {"load", "flood", "concepts", "cold"}:
        p.error(f"--parts {sorted(args.parts)}: choose from load, flood, concepts, cold")
    if args.small:
        args.concepts, args.requests, args.rounds, args.concurrency, args.cold = 8, 16, 1, 8, 4
        args.max_tokens, args.load_requests, args.load_rounds, args.max_answer = 4, 12, 1, 16
        args.flood, args.quiet = 6, 3
    return args


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


# -- 1. realistic load, in process -----------------------------------------------------------------


def make_trace(args, concepts, seed=0):
    """(arrival s, tenant, Chat): Poisson arrivals, each request naming 1-2 of its tenant's concepts."""
    from serve.schemas import Chat
    from yollava.prompt import Message, mentions

    rng = random.Random(seed)
    by_tenant: dict[str, list[str]] = {}
    for owner, name in concepts:
        by_tenant.setdefault(owner, []).append(name)
    tenants = sorted(by_tenant)
    t, trace = 0.0, []
    for i in range(args.load_requests):
        t += rng.expovariate(args.rate)
        tenant = tenants[i % len(tenants)]
        names = rng.sample(by_tenant[tenant], min(len(by_tenant[tenant]), rng.randint(1, 2)))
        text = "Tell me about " + " and ".join(f"<{n}>" for n in names) + rng.choice(
            [".", " in the photo.", ", please.", " and what colour it is."])
        n = rng.randint(args.min_tokens, args.max_answer)
        trace.append((t, tenant, Chat([Message("user", text)], [], mentions(text), n, 0.0, 1.0, (),
                                      stream=i % 2 == 0)))
    return trace


async def run_trace(engine, trace):
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def one(at, tenant, chat):
        await asyncio.sleep(max(0.0, t0 + at - loop.time()))
        start = loop.time()
        events = [ev async for ev in engine.chat(tenant, chat)]
        return start, loop.time(), events

    out = await asyncio.gather(*(one(*x) for x in trace))
    wall = max(end for _, end, _ in out) - t0
    tokens = sum(ev[-1].get("completion_tokens", 0) for _, _, ev in out)
    lat = [end - start for start, end, _ in out]
    errors = [ev[-1] for _, _, ev in out if ev[-1]["event"] != "end"]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed in the load: {errors[:3]}")
    texts = ["".join(e["text"] for e in ev if e["event"] == "delta") for _, _, ev in out]
    return {"tokens_per_s": tokens / wall, "p50_s": statistics.median(lat), "p95_s": pct(lat, 95),
            "wall_s": wall, "tokens": tokens}, texts


def realistic_load(args, store, bb, concepts) -> dict:
    from bench.static_engine import StaticScheduler
    from serve.engine import ChatEngine

    trace = make_trace(args, concepts)
    names = ["static", "static_new_decoder", "continuous"]
    engines = {n: ChatEngine(bb, store, revalidate_s=3600, max_batch_size=args.max_batch) for n in names}
    engines["static"].scheduler = StaticScheduler(engines["static"].generator, args.max_batch, 0.005)
    g = engines["static_new_decoder"].generator
    engines["static_new_decoder"].scheduler = StaticScheduler(g, args.max_batch, 0.005, generate=g.generate)
    warm = [(0.0, t, c.__class__(c.messages, [], c.refs, 2, 0.0, 1.0, ())) for _, t, c in trace]
    for e in engines.values():  # every concept cached, the first passes done
        asyncio.run(run_trace(e, warm))
    per = {n: [] for n in names}
    texts = {}
    for r in range(args.load_rounds):
        for name in names[r % 3:] + names[:r % 3]:
            fig, texts[name] = asyncio.run(run_trace(engines[name], trace))
            per[name].append(fig)
            print(f"  round {r + 1} {name:>18}: {fig['tokens_per_s']:7.1f} tokens/s, p50 {fig['p50_s']:.2f} s, "
                  f"p95 {fig['p95_s']:.2f} s ({fig['tokens']} tokens in {fig['wall_s']:.1f} s)", flush=True)
    for name in names[1:]:
        if texts[name] != texts["static"]:
            bad = sum(a != b for a, b in zip(texts["static"], texts[name]))
            raise RuntimeError(f"{bad} answers differ between the static engine and {name}")

    def ratio(name, key):
        return statistics.median(c[key] / s[key] for s, c in zip(per["static"], per[name]))

    out = {"load_throughput_ratio": ratio("continuous", "tokens_per_s"),
           "load_p95_ratio": ratio("continuous", "p95_s"), "load_p50_ratio": ratio("continuous", "p50_s"),
           "static_new_decoder_throughput_ratio": ratio("static_new_decoder", "tokens_per_s"),
           "static_new_decoder_p95_ratio": ratio("static_new_decoder", "p95_s")}
    for name in names:
        for key in ("tokens_per_s", "p50_s", "p95_s"):
            out[f"{name}_{key}"] = statistics.median(f[key] for f in per[name])
    print(f"realistic load ({args.load_requests} requests, Poisson {args.rate:g}/s, answers {args.min_tokens}-"
          f"{args.max_answer} tokens, batch <= {args.max_batch}), vs the static engine: continuous throughput "
          f"{out['load_throughput_ratio']:.2f}x, p95 latency {out['load_p95_ratio']:.2f}x, p50 latency "
          f"{out['load_p50_ratio']:.2f}x; static batches on the new decoder {out['static_new_decoder_throughput_ratio']:.2f}x "
          f"and {out['static_new_decoder_p95_ratio']:.2f}x (same answers)", flush=True)
    return out


# -- 2. flood, 3. concepts vs none, 4. cold vs warm: through the app ---------------------------------


def body(text, max_tokens, **kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, **kw}


async def run_load(url, keys, bodies, concurrency):
    """POST every (tenant, body) with `concurrency` in flight; returns (seconds, completion tokens)."""
    sem = asyncio.Semaphore(concurrency)
    tokens = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def one(tenant, b):
            nonlocal tokens
            async with sem:
                r = await client.post("/v1/chat/completions", json=b,
                                      headers={"Authorization": f"Bearer {keys[tenant]}"})
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(one(t, b) for t, b in bodies))
        return time.perf_counter() - t0, tokens


async def flood(url, keys, args) -> dict:
    loud, quiet = "t0", "t1"
    limits = httpx.Limits(max_connections=args.flood + 8, max_keepalive_connections=args.flood + 8)
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def post(tenant, b):
            r = await client.post("/v1/chat/completions", json=b, headers={"Authorization": f"Bearer {keys[tenant]}"})
            statuses.append(r.status_code)
            return r

        async def quiet_run(tag):
            lat = []
            for i in range(args.quiet):
                t0 = time.perf_counter()
                r = await post(quiet, body(f"Say hello number {i}.", 16))
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t0)
            return lat

        alone = await quiet_run("alone")
        long_answer = max(args.max_answer, 16)
        floods = [asyncio.ensure_future(post(loud, body(f"Describe everything in the world, part {i}.", long_answer)))
                  for i in range(args.flood)]
        await asyncio.sleep(0.5)  # the flood is in
        under = await quiet_run("flood")
        flood_left = sum(not f.done() for f in floods)
        await asyncio.gather(*floods)
    fig = {"quiet_alone_p50_s": statistics.median(alone), "quiet_flood_p50_s": statistics.median(under),
           "flood_ratio": statistics.median(under) / statistics.median(alone),
           "flood_5xx": sum(s >= 500 for s in statuses),
           "flood_429": statuses.count(429), "flood_requests": len(statuses)}
    print(f"flood: {args.flood} concurrent answers of {long_answer} tokens by one tenant ({flood_left} still "
          f"running when the quiet tenant had finished); the quiet tenant's p50 {fig['quiet_alone_p50_s'] * 1000:.0f} ms "
          f"alone, {fig['quiet_flood_p50_s'] * 1000:.0f} ms under the flood ({fig['flood_ratio']:.2f}x); statuses: "
          f"{fig['flood_5xx']} 5xx, {fig['flood_429']} 429 of {len(statuses)}", flush=True)
    return fig


def concepts_vs_none(app, keys, args, with_c, plain) -> dict:
    totals = {"concepts": [0.0, 0, 0], "plain": [0.0, 0, 0]}
    per_round, out = [], {}
    for r in range(args.rounds):
        tps = {}
        modes = (("concepts", with_c), ("plain", plain))
        for mode, load in modes if r % 2 == 0 else modes[::-1]:
            secs, toks = asyncio.run(run_load(app.url, keys, load, args.concurrency))
            t = totals[mode]
            t[0], t[1], t[2] = t[0] + secs, t[1] + toks, t[2] + len(load)
            tps[mode] = (toks / secs, len(load) / secs)
        per_round.append((tps["concepts"][0] / tps["plain"][0], tps["concepts"][1] / tps["plain"][1]))
        print(f"  round {r + 1}: tokens/s ratio {per_round[-1][0]:.3f}, requests/s ratio {per_round[-1][1]:.3f}")
    for mode, (secs, toks, n) in totals.items():
        out[f"{mode}_rps"] = n / secs
        out[f"{mode}_tokens_per_s"] = toks / secs
        print(f"{mode:>10}: {n} requests in {secs:.2f} s: {n / secs:.1f} req/s, {toks / secs:.1f} tokens/s "
              f"({args.concurrency} concurrent, max_tokens {args.max_tokens})")
    out["ratio"] = statistics.median(r[0] for r in per_round)
    out["rps_ratio"] = statistics.median(r[1] for r in per_round)
    print(f"ratio with/without concepts (median of rounds): tokens/s {out['ratio']:.3f}, "
          f"requests/s {out['rps_ratio']:.3f}")
    return out


def cold_vs_warm(app, keys, cold) -> dict:
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
    lat["cold_overhead_p50_ms"] = lat["cold_p50_ms"] - lat["warm_p50_ms"]
    print(f"first use (loaded from S3): p50 {lat['cold_p50_ms']:.1f} ms, p95 {lat['cold_p95_ms']:.1f} ms; "
          f"cached: p50 {lat['warm_p50_ms']:.1f} ms, p95 {lat['warm_p95_ms']:.1f} ms; "
          f"cold-load overhead p50 {lat['cold_overhead_p50_ms']:.1f} ms")
    return lat


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
    try:
        result = run_parts(args, endpoint)
    finally:
        if server is not None:
            server.stop()
    result = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}
    print(json.dumps(result))
    return result


def run_parts(args, endpoint) -> dict:
    import boto3
    import torch

    from cluster.store import open_store
    from serve.app import AppArgs
    from serve.keys import create_key
    from serve.local import start
    from yollava.artifacts import ConceptArtifact
    from yollava.backbone import load_backbone
    from yollava.concept_model import ConceptRows
    from yollava.tokens import ConceptTokens

    torch.set_num_threads(args.threads)
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

    result = {}
    if "load" in args.parts:
        print("1. realistic load, in process: static vs continuous", flush=True)
        result.update(realistic_load(args, store, bb, concepts))
    if not args.parts & {"flood", "concepts", "cold"}:
        return result
    keys_file = Path(tempfile.mkdtemp(prefix="bench-keys-")) / "keys.json"
    keys = {t: create_key(keys_file, t) for t in tenants}
    app = start(AppArgs(store=uri, keys=str(keys_file), model="tiny", s3_endpoint_url=endpoint,
                        max_batch_size=args.max_batch, revalidate_s=args.revalidate_s, torch_threads=args.threads,
                        limits={"max_concepts": 8, "max_tokens": max(args.max_answer, args.max_tokens, 128)},
                        tenant_limits={"requests_per_s": 1000, "burst": 1000, "max_in_flight": 256}),
                env={"PYTHONPATH": str(ROOT), **{k: os.environ[k] for k in DUMMY_AWS}},
                log_to_driver=False)
    try:
        with_c = [(o, body(f"Tell me about <{n}> in the photo.", args.max_tokens))
                  for o, n in (concepts[i % len(concepts)] for i in range(args.requests))]
        plain = [(o, body(b["messages"][0]["content"].replace("<", "").replace(">", ""), args.max_tokens))
                 for o, b in with_c]
        # warm up: every concept cached, the model's first passes done
        asyncio.run(run_load(app.url, keys, with_c[:args.concepts] + plain[:args.concurrency], args.concurrency))
        if "flood" in args.parts:
            print("2. flood, through the app", flush=True)
            result.update(asyncio.run(flood(app.url, keys, args)))
        if "concepts" in args.parts:
            print("3. 64 concepts vs none, through the app", flush=True)
            result.update(concepts_vs_none(app, keys, args, with_c, plain))
        if "cold" in args.parts:
            print("4. cold vs warm concept, through the app", flush=True)
            result.update(cold_vs_warm(app, keys, cold))
    finally:
        app.stop()
    return result


if __name__ == "__main__":
    main()
