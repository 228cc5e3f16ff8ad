"""KV layout for continuous batching: the decoder's in-place buffers vs the layouts before it.

    python -m bench.kv_layout [--small]

Three layouts run the same churn in one process (same model, requests, arrival steps, greedy),
side by side and alternating over rounds; all must give the same tokens (checked):

- in_place: `yollava.generate.Decoder`: buffers with spare columns and rows; a step writes its
  column in place, a retired row's slot is filled by moving one row, newcomers are written into
  free rows (the whole cache is copied only when the spare runs out);
- concat: one padded cache as before (TGI's layout before paged attention): every step
  concatenates the new column onto the whole cache, retiring and joining copy it all;
- per_row: each row keeps its own keys and values, stacked (left-padded) into a batch every step.

Printed: decode tokens/s of each and the ratios per model width; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import replace

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from yollava.backbone import Backbone
from yollava.generate import Decoder, GenerationRequest, Generator, SamplingParams, _join, _pad_left, _select
from yollava.prompt import Message
from yollava.tiny import TinySizes, build_tiny_llava


def _concat_cache(b) -> DynamicCache:
    """A DynamicCache over the batch's keys and values: the model concatenates its new column."""
    cache = DynamicCache()
    for k, v in b.views():
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


class ConcatDecoder(Decoder):
    """The layout before the in-place buffers: copies of the whole cache at every step."""

    _retire_rows = staticmethod(_select)
    _add_rows = staticmethod(_join)
    _cache = staticmethod(_concat_cache)


class PerRowDecoder(ConcatDecoder):
    """Each row keeps its own (1, H, L, D) keys and values; every step stacks them (left-padded)
    into one batch, runs it, and appends the new column to each row's own tensors."""

    def _prefill(self, rows):
        b = super()._prefill(rows)
        for i, row in enumerate(b.rows):
            n = int(b.mask[i].sum())
            row.kv = [(k[i:i + 1, :, -n:].clone(), v[i:i + 1, :, -n:].clone()) for k, v in b.views()]
        return replace(b, kv=[])

    def _forward(self, full, rows, chosen):
        b = full if len(rows) == len(full.rows) else _select(full, [full.rows.index(r) for r in rows])
        T = b.width
        stacked = [(torch.cat([_pad_left(r.kv[layer][0], T - r.kv[layer][0].shape[2], -2) for r in b.rows]),
                    torch.cat([_pad_left(r.kv[layer][1], T - r.kv[layer][1].shape[2], -2) for r in b.rows]))
                   for layer in range(len(b.rows[0].kv))]  # (B, H, T, D) per layer
        out = super()._forward(replace(b, kv=stacked, lo=0), b.rows, chosen)
        for i, r in enumerate(out.rows):  # the new column is the batch's last
            r.kv = [(torch.cat([kr, k[i:i + 1, :, -1:]], 2), torch.cat([vr, v[i:i + 1, :, -1:]], 2))
                    for (kr, vr), (k, v) in zip(r.kv, out.views())]
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
        arms = [("in_place", Decoder), ("concat", ConcatDecoder), ("per_row", PerRowDecoder)]
        tps = {name: [] for name, _ in arms}
        outs = {}
        for r in range(args.rounds):
            for name, cls in arms[r % 3:] + arms[:r % 3]:
                secs, toks, outs[name] = run(cls(gen), reqs, arrivals, args.max_batch)
                tps[name].append(toks / secs)
        for name in ("concat", "per_row"):
            assert outs[name] == outs["in_place"], f"the {name} layout gave different tokens"
        med = {name: statistics.median(v) for name, v in tps.items()}
        key = f"h{hidden}x{layers}"
        for name, v in med.items():
            result[f"{key}_{name}_tokens_per_s"] = round(v, 1)
        result[f"{key}_in_place_over_concat"] = round(med["in_place"] / med["concat"], 3)
        result[f"{key}_in_place_over_per_row"] = round(med["in_place"] / med["per_row"], 3)
        print(f"text {hidden}x{layers}, prompts of {words[0]}-{words[1]} words, {new[0]}-{new[1]} new tokens, "
              f"{args.requests} requests, batch <= {args.max_batch}: in place {med['in_place']:.1f} tokens/s, "
              f"concatenating {med['concat']:.1f}, per-row stacked {med['per_row']:.1f}; in place / concat "
              f"{med['in_place'] / med['concat']:.3f}, / per-row {med['in_place'] / med['per_row']:.3f} "
              f"(median of {args.rounds} rounds)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
