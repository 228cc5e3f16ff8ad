"""Where continuous batching's throughput comes from on a CPU: every request queued at once.

    python -m bench.closed_batch [--small]

One process, one torch thread, the same requests (answers of `--min`..`--max` tokens, greedy):
static batches of `--batch` through `Generator.generate` (the step-wise decoder, which retires a
finished row at once, so no step is spent on it) against one continuous decoder that admits
queued requests once `--admit-at` rows are free. Alternating over rounds; both must give the same
tokens. On a GPU a step costs about the same for 1 or 32 rows, so filling freed rows is nearly
free throughput; on one CPU thread a step's cost grows with its rows, so what the continuous side
can win here is a step's fixed cost shared by more rows, against the prefill passes and the
padding of rows of different ages that it pays. Printed: tokens/s of each, their ratio; the last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from yollava.backbone import load_backbone
from yollava.generate import GenerationRequest, Generator, SamplingParams
from yollava.prompt import Message


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.closed_batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="a quick run (the test suite's)")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--min", type=int, default=8, help="fewest answer tokens")
    p.add_argument("--max", type=int, default=256, help="most answer tokens")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--admit-at", type=int, default=1, help="continuous: admit once this many rows are free "
                   "(or the batch is empty)")
    args = p.parse_args(argv)
    if args.small:
        args.requests, args.batch, args.max, args.rounds = 12, 4, 24, 1
    return args


def requests(args) -> list[GenerationRequest]:
    rng = random.Random(0)
    return [GenerationRequest([Message("user", "Tell me about the photo" + "." * rng.randint(0, 5))],
                              params=SamplingParams(max_new_tokens=rng.randint(args.min, args.max)), stream=False)
            for _ in range(args.requests)]


def static(gen: Generator, reqs: list[GenerationRequest], batch: int) -> list[list[int]]:
    return [r.token_ids for i in range(0, len(reqs), batch) for r in gen.generate(reqs[i:i + batch])]


def continuous(gen: Generator, reqs: list[GenerationRequest], batch: int, admit_at: int = 1) -> list[list[int]]:
    dec, pending, out = gen.decoder(), list(enumerate(reqs)), {}
    while pending or len(dec):
        room = batch - len(dec)
        if pending and (room >= admit_at or not len(dec)):
            for key, kind, value in dec.admit(dict(pending[:room])):
                if kind == "error":
                    raise RuntimeError(f"request {key}: {value}")
            pending = pending[room:]
        for key, kind, value in dec.step():
            if kind == "error":
                raise RuntimeError(f"request {key}: {value}")
            if kind == "done":
                out[key] = value.token_ids
    return [out[i] for i in range(len(reqs))]


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(1)
    gen = Generator(load_backbone("tiny"))
    reqs = requests(args)
    arms = {"static": static, "continuous": lambda g, r, b: continuous(g, r, b, args.admit_at)}
    per: dict[str, list[float]] = {n: [] for n in arms}
    tokens: dict[str, list[list[int]]] = {}
    for r in range(args.rounds):
        for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            t0 = time.perf_counter()
            tokens[name] = arms[name](gen, reqs, args.batch)
            dt = time.perf_counter() - t0
            n = sum(map(len, tokens[name]))
            per[name].append(n / dt)
            print(f"  round {r + 1} {name:>10}: {n / dt:8.1f} tokens/s ({n} tokens in {dt:.2f} s)", flush=True)
    if tokens["static"] != tokens["continuous"]:
        raise RuntimeError("the continuous decoder's tokens differ from the static batches'")
    ratio = statistics.median(c / s for s, c in zip(per["static"], per["continuous"]))
    result = {"requests": args.requests, "batch": args.batch, "admit_at": args.admit_at,
              "continuous_vs_static_throughput": round(ratio, 3),
              **{f"{n}_tokens_per_s": round(statistics.median(v), 1) for n, v in per.items()}}
    print(f"every request queued at once ({args.requests}, answers {args.min}-{args.max} tokens, batch "
          f"{args.batch}, admitted {args.admit_at}+ at a time): continuous / static throughput {ratio:.2f}x (same tokens)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
