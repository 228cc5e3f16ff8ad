"""Pretrain the miniature LLaVA on the miniature world (reproducible, seeded).

    python -m yollava.miniworld.pretrain [--minutes 60] [--out yollava/miniworld/weights]

Everything trains: vision tower, projector, language model. Three losses:
- the answers (next-token cross-entropy on the assistant's words);
- per-patch vision heads: each image token's cell — shape, colour, pattern,
  notch, or empty — read from the vision tower (so the tower sees the detail);
- alignment: each image token, after the projector, close to the sum of the
  word embeddings of its cell's attributes (plus a learned vector per notch),
  so image tokens live at word-embedding scale in the words' directions from
  step 0 and the language model can match question words against them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from yollava.backbone import Backbone
from yollava.batching import right_pad, token_logprobs
from yollava.concept_model import ConceptLM, ConceptRows, ConceptTable
from yollava.miniworld import world
from yollava.miniworld.model import WEIGHTS, build_mini_llava
from yollava.miniworld.tasks import NUM_NAMES, MAKERS, MIX, Task, sample_task
from yollava.prompt import Message, PromptEncoder
from yollava.tokens import ConceptTokens

log = logging.getLogger("yollava.miniworld.pretrain")
HEADS = {"shape": world.SHAPES, "colour": world.COLOURS, "pattern": world.PATTERNS, "notch": world.NOTCHES}


class MiniPretrainer(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        model, tok, proc = build_mini_llava(seed)
        self.backbone = Backbone("mini", model, tok, proc)
        model.requires_grad_(True)  # Backbone freezes; pretraining trains everything
        model.train()
        self.model = model
        self.lm = ConceptLM(self.backbone)
        self.enc = PromptEncoder.for_backbone(self.backbone)
        d, dv = self.backbone.hidden_size, model.config.vision_config.hidden_size
        g = torch.Generator().manual_seed(seed + 1)
        self.name_embed = nn.Parameter(torch.randn(NUM_NAMES, d, generator=g) * 0.02)
        self.name_head = nn.Parameter(torch.randn(NUM_NAMES, d, generator=g) * 0.02)
        self.notch = nn.Parameter(torch.randn(len(world.NOTCHES), d, generator=g) * 0.02)
        self.heads = nn.ModuleDict({k: nn.Linear(dv, len(v) + 1) for k, v in HEADS.items()})  # +1: empty
        self.word = {w: tok.convert_tokens_to_ids(w) for w in
                     [*world.SHAPES, *world.COLOURS, *world.PATTERNS, "empty"]}

    # -- vision ------------------------------------------------------------------------
    def encode_images(self, scenes: list[world.Scene]):
        """Scenes -> (image tokens (N, 9, d), vision aux loss, alignment loss)."""
        pv = self.backbone.preprocess([s.render() for s in scenes])
        vt = self.model.model.vision_tower(pv, output_hidden_states=True)
        patches = vt.hidden_states[self.model.config.vision_feature_layer][:, 1:]  # (N, 9, dv)
        tokens = self.model.model.multi_modal_projector(patches)  # (N, 9, d)
        aux = 0.0
        for key, values in HEADS.items():
            target = torch.tensor([[len(values) if o is None else list(values).index(getattr(o, key))
                                    for o in s.cells] for s in scenes])  # (N, 9)
            aux = aux + F.cross_entropy(self.heads[key](patches).flatten(0, 1), target.flatten())
        target = self._align_targets(scenes)
        align = F.mse_loss(tokens, target) / target.pow(2).mean().detach()  # relative: scale-free
        return tokens, aux, align

    def _align_targets(self, scenes) -> torch.Tensor:
        E = self.backbone.embed_tokens.weight.detach()
        rows = []
        for s in scenes:
            for o in s.cells:
                if o is None:
                    rows.append(E[self.word["empty"]])
                else:
                    rows.append(E[self.word[o.shape]] + E[self.word[o.colour]] + E[self.word[o.pattern]]
                                + self.notch[o.notch])
        return torch.stack(rows).view(len(scenes), world.GRID * world.GRID, -1)

    # -- one batch ---------------------------------------------------------------------
    def loss(self, tasks: list[Task]) -> dict[str, torch.Tensor]:
        scenes = [t.scene for t in tasks if t.scene is not None]
        examples = [ex for t in tasks if t.definition for ex in t.definition.examples]
        all_scenes = scenes + [s for s, _ in examples]
        tokens, aux, align = self.encode_images(all_scenes) if all_scenes else (None, torch.zeros(()),
                                                                                   torch.zeros(()))
        ex_tokens = iter([tokens[len(scenes) + i, cell] for i, (_, cell) in enumerate(examples)])
        rows, encs = [], []
        for t in tasks:
            concepts = []
            if t.definition is not None:
                concepts = [self._rows(t.definition, ex_tokens)]
            rows.append(concepts)
            encs.append(self.enc.encode(t.messages, [c.tokens for c in concepts]))
        batch = right_pad(encs)
        table = ConceptTable.build(rows, self.backbone.hidden_size, torch.float32, "cpu")
        feats = tokens[:len(scenes)] if scenes else None
        x = self.lm.embed(batch.ids, table, feats, batch.image_mask)
        h, _ = self.lm.hidden(x, batch.mask)
        logp, _ = token_logprobs(self.lm, h, batch.labels, table)
        return {"lm": -logp.mean(), "aux": aux, "align": align}

    def _rows(self, d, ex_tokens) -> ConceptRows:
        if d.words is not None:
            ids = self.enc.text_ids(d.words)
            latents = self.backbone.embed_tokens(torch.tensor(ids))  # (m, d)
        else:
            latents = torch.stack([next(ex_tokens) for _ in d.examples])  # (m, d)
        embed = torch.cat([self.name_embed[d.name:d.name + 1], latents])
        head = torch.cat([self.name_head[d.name:d.name + 1], torch.zeros_like(latents)])
        return ConceptRows(ConceptTokens(f"n{d.name}", latents.shape[0]), embed, head)

    # -- probes ------------------------------------------------------------------------
    @torch.no_grad()
    def probe(self, kinds=("existence", "attribute", "counting", "naming_words", "naming_example"),
              n: int = 200, seed: int = 12345) -> dict[str, float]:
        """Held-out accuracy per task kind: the likeliest of the candidate answers."""
        self.model.eval()
        out = {}
        for kind in kinds:
            rng = random.Random(f"{seed}:{kind}")
            hits = 0
            for _ in range(n):
                t = MAKERS[kind](rng)
                scores = []
                for cand in t.candidates:
                    tt = Task(t.kind, t.scene, [t.messages[0], Message("assistant", cand)], t.definition)
                    scores.append(self._answer_logp(tt))
                hits += int(max(range(len(scores)), key=scores.__getitem__) == t.correct)
            out[kind] = hits / n
        self.model.train()
        return out

    def _answer_logp(self, t: Task) -> float:
        scenes = [t.scene] + ([s for s, _ in t.definition.examples] if t.definition else [])
        tokens, _, _ = self.encode_images(scenes)
        ex = iter([tokens[1 + i, cell] for i, (_, cell) in enumerate(t.definition.examples)]) if t.definition else None
        concepts = [self._rows(t.definition, ex)] if t.definition else []
        e = self.enc.encode(t.messages, [c.tokens for c in concepts])
        e.labels[-1] = -100  # the EOS
        batch = right_pad([e])
        table = ConceptTable.build([concepts], self.backbone.hidden_size, torch.float32, "cpu")
        x = self.lm.embed(batch.ids, table, tokens[:1], batch.image_mask)
        h, _ = self.lm.hidden(x, batch.mask)
        logp, _ = token_logprobs(self.lm, h, batch.labels, table)
        return float(logp.sum())


def train(minutes: float, batch: int, lr: float, seed: int, out: Path | None, probe_every: int,
          mix: dict | None = None) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pt = MiniPretrainer(seed)
    opt = torch.optim.AdamW(pt.parameters(), lr=lr, weight_decay=0.01)
    t_end = time.time() + 60 * minutes
    step, history = 0, []
    bar = tqdm(desc="pretraining", unit="step")
    while time.time() < t_end:
        frac = 1 - max(0.0, t_end - time.time()) / (60 * minutes)
        for g in opt.param_groups:  # warm-up then cosine, over wall time
            g["lr"] = lr * min(1.0, step / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        tasks = [sample_task(rng, mix or MIX) for _ in range(batch)]
        losses = pt.loss(tasks)
        total = losses["lm"] + losses["aux"] + losses["align"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(pt.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix({k: round(float(v.detach()), 3) for k, v in losses.items()})
        if probe_every and step % probe_every == 0:
            acc = pt.probe(n=60)
            history.append({"step": step, "minutes": round((time.time() - t_end) / 60 + minutes, 1), **acc,
                            **{k: round(float(v), 4) for k, v in losses.items()}})
            log.info("step %d %s", step, history[-1])
    bar.close()
    final = pt.probe(n=400)
    result = {"steps": step, "batch": batch, "lr": lr, "seed": seed, "minutes": minutes, "probe": final,
              "history": history}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        pt.model.save_pretrained(out, safe_serialization=True)
        (out / "pretrain.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="pretrain the miniature LLaVA")
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe-every", type=int, default=200)
    ap.add_argument("--out", default=str(WEIGHTS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = train(args.minutes, args.batch, args.lr, args.seed, Path(args.out) if args.out else None,
                   args.probe_every)
    print(json.dumps(result["probe"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
