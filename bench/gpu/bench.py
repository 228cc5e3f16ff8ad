"""LLaVA-1.5-7B/13B-shaped training and serving figures on one GPU, random weights, the real vocabulary.

Random weights are fine for timing and never for accuracy: nothing here
reports accuracy. The models come from `yollava.checkpoints` (the same
builder as the tests' LLaVA-1.5 checkpoint): the real Llama 2 tokenizer with
`<image>` and `<pad>`, 32,064 embedding and head rows, 576 image tokens per
photo at 336 px. Training: the packed trainer against the faithful
re-implementation of the official loop (bench/official_loop.py), same
samples, at pack sizes 1, 8, 32; seconds per subject for the paper's recipe
(5 photos, 200 negatives, ~40 text conversations, 15 epochs) are extrapolated
from measured steps, and say so. Serving: decode tokens/s of the chat path
(yollava Generator, 64 distinct concepts over the batch) against Hugging Face
`generate` on the same base with no concepts, at batch 1, 8, 32.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.official_loop import train_official
from yollava.backbone import Backbone
from yollava.checkpoints import SHAPES, LlavaShape as Shape, build_llava15_backbone
from yollava.concept_model import ConceptRows
from yollava.generate import GenerationRequest, Generator, SamplingParams
from yollava.prompt import Message, PromptEncoder
from yollava.recipe import RecipeConfig, build_training_set
from yollava.tokens import ConceptTokens
from yollava.trainer import PackedTrainer

PAPER = {"photos": 5, "negatives": 200, "text": 40, "epochs": 15}
REAL_TOKENIZER = Path(__file__).resolve().parents[2] / "tests" / "data" / "llama2-tokenizer" / "llava-1.5"


def build(shape: Shape, device: str, dtype: torch.dtype, tokenizer: str | Path = REAL_TOKENIZER) -> Backbone:
    """Random weights made directly on the device (no host copy of a 13B model)."""
    return build_llava15_backbone(shape, tokenizer, seed=0, device=device, dtype=dtype)


def photos(n: int, size: int, seed: int) -> dict[str, Image.Image]:
    rng = np.random.default_rng(seed)
    return {f"img{seed}_{i}": Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
            for i in range(n)}


def workload(n_subjects: int, recipe: dict, cfg: RecipeConfig, size: int):
    """Subjects with the paper's sample counts; a few distinct photos reused as the pool."""
    pool = photos(16, size, seed=999)
    pool_ids = list(pool)
    images, sets = dict(pool), []
    attrs = [("Describe {c} in detail.", "A brown dog with a white patch on its chest and floppy ears.")]
    for s in range(n_subjects):
        own = photos(recipe["photos"], size, seed=s)
        images.update(own)
        negs = [pool_ids[i % len(pool_ids)] for i in range(recipe["negatives"])]
        ts = build_training_set(f"s{s}", list(own), [], [], attrs * recipe["text"], cfg)
        neg_samples = build_training_set(f"s{s}", list(own), negs[:1], [], [], cfg).train
        neg = [x for x in neg_samples if x.kind == "negative"][0]
        ts.train += [type(neg)(neg.subject, "negative", neg.messages, type(neg.photo)(k)) for k in negs]
        sets.append(ts)
    return images, sets


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def flops_per_sample(shape: Shape, backbone: Backbone, prompt_tokens: int, suffix_tokens: int) -> dict:
    """Model FLOPs (2 per MAC) of one training sample, official vs packed (prefix cached)."""
    n_lm = 12 * shape.layers * shape.hidden ** 2  # attention + MLP weights, approximately
    n_vis = 12 * shape.vision_layers * shape.vision_hidden ** 2
    vis = 2 * n_vis * backbone.num_image_tokens
    official = vis + 2 * n_lm * prompt_tokens * 2  # forward + input-grad backward over the whole prompt
    packed = 2 * n_lm * suffix_tokens * 2  # suffix forward + backward; prefix once, amortised away
    return {"official": official, "packed": packed}


def bench_training(backbone: Backbone, shape: Shape, device: str, packs: list[int], steps: int,
                   official_steps: int, recipe: dict) -> list[dict]:
    cfg = RecipeConfig(num_latent=16, positive_questions=1, hard_negatives=0, easy_negatives=0,
                       attribute_questions=0, epochs=1, batch_size=4, holdout=0.0)
    per_subject = recipe["photos"] * 2 + recipe["negatives"] + recipe["text"]
    rows = []
    images, sets = workload(max(packs), recipe, cfg, shape.image_size)
    enc = PromptEncoder.for_backbone(backbone).encode(sets[0].train[0].messages, [ConceptTokens("s0", 16)])
    fl = flops_per_sample(shape, backbone, len(enc), len(enc) - enc.prefix_len)

    # official loop: batch 1, a few steps of one subject
    sub = sets[0]
    sub_short = type(sub)(sub.subject, sub.train[:official_steps])
    cfg1 = RecipeConfig(**{**cfg.to_dict(), "epochs": 1})
    train_official(backbone, type(sub)(sub.subject, sub.train[:2]), cfg1, images.__getitem__)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    train_official(backbone, sub_short, cfg1, images.__getitem__)
    sync(device)
    off_sps = len(sub_short.train) / (time.perf_counter() - t0)
    rows.append(_train_row("official", 1, off_sps, per_subject, recipe, fl["official"]))

    for pack in packs:
        tr = PackedTrainer(backbone, cfg, images.__getitem__, progress=False, prefix_cache_mb=0,
                           micro_batch=32)
        chosen = [type(ts)(ts.subject, ts.train[:cfg.batch_size * steps]) for ts in sets[:pack]]
        tr.fit([type(ts)(ts.subject, ts.train[:cfg.batch_size]) for ts in chosen])  # warm-up, fills features
        sync(device)
        t0 = time.perf_counter()
        tr.fit(chosen)
        sync(device)
        n = sum(len(ts.train) for ts in chosen)
        rows.append(_train_row("packed", pack, n / (time.perf_counter() - t0), per_subject, recipe,
                               fl["packed"]))
    for r in rows:
        r["speedup_vs_official"] = round(r["samples_per_s"] / off_sps, 2)
    return rows


def _train_row(method, pack, sps, per_subject, recipe, flops) -> dict:
    subject_s = per_subject * recipe["epochs"] / sps
    return {"method": method, "pack": pack, "samples_per_s": round(sps, 2),
            "s_per_subject_paper_recipe": round(subject_s, 1),
            "subjects_per_gpu_hour": round(3600 / subject_s, 2),
            "model_tflops": round(flops * sps / 1e12, 2)}


def bench_serving(backbone: Backbone, shape: Shape, device: str, batches: list[int], new_tokens: int) -> list[dict]:
    d = backbone.hidden_size
    g = torch.Generator(device="cpu").manual_seed(0)
    concepts = [ConceptRows(ConceptTokens(f"c{i}", 16), torch.randn(17, d, generator=g) * 0.02,
                            torch.randn(17, d, generator=g) * 0.02) for i in range(64)]
    image = photos(1, shape.image_size, seed=7)["img7_0"]
    gen = Generator(backbone)
    tok = backbone.tokenizer
    rows = []
    for B in batches:
        reqs = [GenerationRequest([Message("user", f"Tell me about <c{i % 64}> and <c{(i + 1) % 64}>.", 1)],
                                  [concepts[i % 64], concepts[(i + 1) % 64]], [image],
                                  SamplingParams(max_new_tokens=new_tokens)) for i in range(B)]
        gen.generate(reqs[:1])  # warm-up
        sync(device)
        t0 = time.perf_counter()
        out = gen.generate(reqs)
        sync(device)
        ours_s = time.perf_counter() - t0
        ours_tokens = sum(len(o.token_ids) for o in out)

        plain = PromptEncoder.for_backbone(backbone).encode([Message("user", "Tell me about it.", 1)])
        ids = torch.tensor([plain.ids] * B, device=backbone.device)
        pv = backbone.preprocess([image] * B).to(backbone.device, backbone.dtype)
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            backbone.model.generate(input_ids=ids[:1], pixel_values=pv[:1], **kw)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            backbone.model.generate(input_ids=ids, pixel_values=pv, **kw)
            sync(device)
        hf_s = time.perf_counter() - t0
        rows.append({"batch": B, "concepts_in_batch": min(64, B + 1),
                     "ours_tokens_per_s": round(ours_tokens / ours_s, 1),
                     "ours_requests_per_s": round(B / ours_s, 2),
                     "hf_no_concepts_tokens_per_s": round(B * new_tokens / hf_s, 1),
                     "hf_requests_per_s": round(B / hf_s, 2),
                     "ratio": round((ours_tokens / ours_s) / (B * new_tokens / hf_s), 3)})
    return rows


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes on the CPU (the test suite's run)")
    ap.add_argument("--models", default="7b,13b")
    ap.add_argument("--out", default="bench/gpu/results.json")
    ap.add_argument("--tokenizer", default=str(REAL_TOKENIZER), help="the converted LLaVA-1.5 tokenizer folder")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    models = ["small"] if args.small else args.models.split(",")
    packs, batches = ([1, 2], [1, 2]) if args.small else ([1, 8, 32], [1, 8, 32])
    recipe = {"photos": 2, "negatives": 6, "text": 2, "epochs": 15} if args.small else PAPER
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "date": time.strftime("%Y-%m-%d"), "dtype": str(dtype), "models": {}}
    for m in models:
        shape = SHAPES[m]
        t0 = time.perf_counter()
        bb = build(shape, device, dtype, args.tokenizer)
        built = time.perf_counter() - t0
        vocab = {"rows": bb.vocab_size, "tokens": len(bb.tokenizer), "image_tokens": bb.num_image_tokens}
        train = bench_training(bb, shape, device, packs, steps=2 if args.small else 3,
                               official_steps=3 if args.small else 12, recipe=recipe)
        serve = bench_serving(bb, shape, device, batches, new_tokens=4 if args.small else 32)
        result["models"][m] = {"shape": shape.name, "vocab": vocab, "build_s": round(built, 1),
                               "training": train, "serving": serve}
        del bb
        if device == "cuda":
            torch.cuda.empty_cache()
    for name, r in result["models"].items():
        print(f"\n## {r['shape']} on {result['device']} ({result['dtype']}), built in {r['build_s']} s; "
              f"vocabulary {r['vocab']['tokens']} tokens / {r['vocab']['rows']} rows, "
              f"{r['vocab']['image_tokens']} image tokens per photo")
        print("\nTraining (seconds per subject extrapolated from measured steps, paper recipe):\n")
        print(table(r["training"]))
        print("\nServing (decode with per-row concepts vs HF generate without concepts):\n")
        print(table(r["serving"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"out": args.out}))
    return result


if __name__ == "__main__":
    main()
