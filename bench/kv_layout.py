"""KV layout for continuous batching: one padded cache joined/selected along the batch
(what `yollava.generate.Decoder` does) vs per-row caches stacked into a batch every step.

    python -m bench.kv_layout [--small]

Both run the same churn in one process (same model, requests, arrival steps, greedy), side by
side and alternating over rounds; both must give the same tokens (checked). Printed: decode
tokens/s of each and their ratio per model width; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import replace

import torch

from yollava.backbone import Backbone
from yollava.generate import Decoder, GenerationRequest, Generator, SamplingParams, _pad_left, _select
from yollava.prompt import Message
from yollava.tiny import TinySizes, build_tiny_llava


class PerRowDecoder(Decoder):
    """Each row keeps its own (1, H, L, D) keys and values; every step stacks them (left-padded)
    into one batch, runs it, and appends the new column to each row's own tensors."""

    def _prefill(self, rows):
        b = super()._prefill(rows)
        for i, row in enumerate(b.rows):
            n = int(b.mask[i].sum())
            row.kv = [(k[i:i + 1, :, -n:].clone(), v[i:i + 1, :, -n:].clone()) for k, v in b.kv]
        return replace(b, kv=[])

    def _forward(self, full, rows, chosen):
        b = full if len(rows) == len(full.rows) else _select(full, [full.rows.index(r) for r in rows])
        T = b.width
        stacked = [(torch.cat([_pad_left(r.kv[layer][0], T - r.kv[layer][0].shape[2], -2) for r in b.rows]),
                    torch.cat([_pad_left(r.kv[layer][1], T - r.kv[layer][1].shape[2], -2) for r in b.rows]))
                   for layer in range(len(b.rows[0].kv))]  # (B, H, T, D) per layer
        out = super()._forward(replace(b, kv=stacked), b.rows, chosen)
        for i, r in enumerate(out.rows):
            r.kv = [(torch.cat([kr, k[i:i + 1, :, -1:]], 2), torch.cat([vr, v[i:i + 1, :, -1:]], 2))
                    for (kr, vr), (k, v) in zip(r.kv, out.kv)]
        return replace(out, kv=[])


def backbone(hidden: int, layers: int) -> Backbone:
    sizes = TinySizes(text_hidden=hidden, text_layers=layers, text_heads=max(4, hidden // 64),
                      text_kv_heads=max(2, hidden // 128))
    model, tok, proc = build_tiny_llava(seed=0, sizes=sizes)
    return Backbone(f"tiny-{hidden}x{layers}", model, tok, proc)


def workload(n: int, seed: int, prompt_words: tuple[int, int], new_tokens: tuple[int, int]):
    rng = random.Random(seed)
    reqs = [GenerationRequest([Message("user", " ".join(rng.choice(["the", "photo", "red", "mug", "is", "a"])
                                                        for _ in range(rng.randint(*prompt_words))))],
                              params=SamplingParams(max_new_tokens=rng.randint(*new_tokens)))
            for _ in range(n)]
    arrivals = sorted(rng.randint(0, 3 * new_tokens[1]) for _ in range(n))  # the step each arrives at
    return reqs, arrivals


def run(decoder: Decoder, reqs, arrivals, max_batch: int) -> tuple[float, int, dict]:
    pending = list(range(len(reqs)))
    out, step, tokens = {}, 0, 0
    t0 = time.perf_counter()
    while pending or len(decoder):
        room = max_batch - len(decoder)
        newcomers = {}
        while pending and arrivals[pending[0]] <= step and len(newcomers) < room:
            k = pending.pop(0)
            newcomers[k] = reqs[k]
        if newcomers:
            decoder.admit(newcomers)
        for key, kind, value in decoder.step():
            if kind == "done":
                out[key] = value.token_ids
                tokens += len(value.token_ids)
            elif kind == "error":
                raise value
        step += 1
    return time.perf_counter() - t0, tokens, out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.kv_layout", description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--max-batch", type=int, default=16)
    args = p.parse_args(argv)
    shapes = [(64, 2, (5, 40), (8, 64)), (512, 4, (150, 300), (8, 128))]
    if args.small:
        shapes, args.rounds, args.requests = [(64, 2, (5, 20), (4, 16))], 1, 8
    result = {}
    for hidden, layers, words, new in shapes:
        gen = Generator(backbone(hidden, layers))
        reqs, arrivals = workload(args.requests, 0, words, new)
        tps = {"concat": [], "per_row": []}
        outs = {}
        for r in range(args.rounds):
            order = [("concat", Decoder), ("per_row", PerRowDecoder)]
            for name, cls in order if r % 2 == 0 else order[::-1]:
                secs, toks, outs[name] = run(cls(gen), reqs, arrivals, args.max_batch)
                tps[name].append(toks / secs)
        assert outs["concat"] == outs["per_row"], "the two layouts gave different tokens"
        c, pr = statistics.median(tps["concat"]), statistics.median(tps["per_row"])
        key = f"h{hidden}x{layers}"
        result[f"{key}_concat_tokens_per_s"] = round(c, 1)
        result[f"{key}_per_row_tokens_per_s"] = round(pr, 1)
        result[f"{key}_concat_over_per_row"] = round(c / pr, 3)
        print(f"text {hidden}x{layers}, prompts of {words[0]}-{words[1]} words, {new[0]}-{new[1]} new tokens, "
              f"{args.requests} requests, batch <= {args.max_batch}: pad/concatenate {c:.1f} tokens/s, "
              f"per-row stacked {pr:.1f} tokens/s, ratio {c / pr:.3f} (median of {args.rounds} rounds)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
