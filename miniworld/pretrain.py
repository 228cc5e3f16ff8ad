"""Pretrain the miniature LLaVA on the miniature world (reproducible, seeded).

    python -m miniworld.pretrain [--minutes 60] [--out models/mini]

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
import contextlib
import copy
import json
import logging
import math
import random
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from miniworld import world
from miniworld.model import WEIGHTS, build_mini_llava, build_mini_tokenizer, save_mini
from miniworld.tasks import CURRICULA, NUM_NAMES, MAKERS, Task, mix_at, sample_task
from yollava.backbone import Backbone
from yollava.concept_model import ConceptLM, ConceptRows
from yollava.prompt import IGNORE_INDEX, PromptEncoder
from yollava.scoring import answer_logprobs, score_rows
from yollava.tokens import ConceptTokens

log = logging.getLogger("miniworld.pretrain")
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
                     [*world.SHAPES, *world.COLOURS, *world.PATTERNS, "empty", "a", "object"]}
        # hidden rows: one per notch corner, frozen, distinct, at word-embedding scale; no string reaches them
        self.register_buffer("hidden_rows", self._make_hidden_rows(seed))
        self.lm_heads = nn.ModuleDict({k: nn.Linear(d, len(v) + 1) for k, v in HEADS.items()})  # middle-layer readouts
        self.readout_layer = model.config.text_config.num_hidden_layers // 2
        self.use_hidden = True

    def _make_hidden_rows(self, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed + 7)
        E = self.backbone.embed_tokens.weight.detach()
        q, _ = torch.linalg.qr(torch.randn(E.shape[1], len(world.NOTCHES), generator=g))  # (d, 4) orthonormal
        return (q.T * E.norm(dim=1).mean()).contiguous()  # (4, d)

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
                    rows.append(self._object_row(o))
        return torch.stack(rows).view(len(scenes), world.GRID * world.GRID, -1)

    def _object_row(self, o) -> torch.Tensor:
        E = self.backbone.embed_tokens.weight.detach()
        notch = self.hidden_rows[o.notch] if self.use_hidden else self.notch[o.notch]
        return E[self.word[o.shape]] + E[self.word[o.colour]] + E[self.word[o.pattern]] + notch

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
        feats = tokens[:len(scenes)] if scenes else None
        with self._capture_middle() as mid:
            logp = score_rows(self.lm, encs, rows, feats)  # (B,) summed answer log-probs
        # each question weighs the same: a long caption does not drown a yes/no decision
        n_tokens = torch.tensor([sum(1 for label in e.labels[1:] if label != IGNORE_INDEX) for e in encs])
        lm = -(logp / n_tokens.clamp(min=1)).mean()
        readout = self._readout_loss(mid[0], tasks, encs)
        return {"lm": lm, "aux": aux, "align": align, "readout": readout}

    @contextlib.contextmanager
    def _capture_middle(self):
        """The output of the language model's middle layer during one forward: (B, T, d)."""
        got: list[torch.Tensor] = []
        layer = self.backbone.language_model.layers[self.readout_layer - 1]
        handle = layer.register_forward_hook(lambda _m, _i, out: got.append(out[0] if isinstance(out, tuple)
                                                                              else out))
        try:
            yield got
        finally:
            handle.remove()

    def _readout_loss(self, mid: torch.Tensor, tasks: list[Task], encs) -> torch.Tensor:
        """Linear heads on a middle layer: each image token's cell, and each definition's object
        (at its last latent), shape / colour / pattern / notch (empty for an empty cell)."""
        feats, targets = [], []
        for b, (t, e) in enumerate(zip(tasks, encs)):
            if t.scene is not None:  # right-padded rows: positions as encoded
                feats.append(mid[b, :len(e)][torch.tensor(e.image_mask, dtype=torch.bool)])  # (9, d)
                targets += list(t.scene.cells)
        for b, (t, e) in enumerate(zip(tasks, encs)):
            d = t.definition
            if d is None or d.obj is None or not e.concepts:
                continue
            last = max(i for i, tok in enumerate(e.ids) if tok >= self.lm.V)  # the last latent of the definition
            feats.append(mid[b, last].unsqueeze(0))
            targets.append(d.obj)
        if not feats:
            return torch.zeros(())
        f = torch.cat(feats)
        loss = 0.0
        for key, values in HEADS.items():
            y = torch.tensor([len(values) if o is None else list(values).index(getattr(o, key)) for o in targets])
            loss = loss + F.cross_entropy(self.lm_heads[key](f), y)
        return loss

    def _rows(self, d, ex_tokens) -> ConceptRows:
        E = self.backbone.embed_tokens.weight
        if d.form == "sum":
            latents = self._object_row(d.obj).unsqueeze(0)  # (1, d)
        elif d.words is not None:
            ids = self.enc.text_ids(d.words)
            latents = self.backbone.embed_tokens(torch.tensor(ids))  # (m, d)
            if d.form == "hidden":
                latents = torch.cat([latents, self.hidden_rows[d.obj.notch:d.obj.notch + 1]])
        else:
            latents = torch.stack([next(ex_tokens) for _ in d.examples])  # (m, d)
        g = torch.Generator().manual_seed(d.draw)
        if d.noise:  # (m, d) gaussian, d.noise of the rows' mean length
            scale = d.noise * latents.detach().norm(dim=-1).mean() / latents.shape[-1] ** 0.5
            latents = latents + scale * torch.randn(latents.shape, generator=g)
        if d.fillers:  # rows drawn like personalization's start, carrying nothing; the real ones among them
            Ed = E.detach()
            fill = Ed.mean(0) + 0.1 * Ed.std(0).mean() * torch.randn(d.fillers, Ed.shape[1], generator=g)
            at = int(torch.randint(d.fillers + 1, (1,), generator=g))
            latents = torch.cat([fill[:at], latents, fill[at:]])
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
                scores = self._candidate_logp(t)
                hits += int(int(scores.argmax()) == t.correct)
            out[kind] = hits / n
        self.model.train()
        return out

    def _candidate_logp(self, t: Task) -> torch.Tensor:
        """(C,) log-probs of the task's candidate answers."""
        own = [t.scene] if t.scene is not None else []
        examples = t.definition.examples if t.definition else []
        scenes = own + [s for s, _ in examples]
        tokens = self.encode_images(scenes)[0] if scenes else None
        ex = iter([tokens[len(own) + i, cell] for i, (_, cell) in enumerate(examples)])
        concepts = [self._rows(t.definition, ex)] if t.definition else []
        return answer_logprobs(self.lm, self.enc, t.messages[:-1], t.candidates, concepts,
                               tokens[:1] if own else None)


PROBES = ("single_check", "existence", "attribute", "counting", "naming_words", "naming_text",
          "naming_example", "naming_notch", "naming_easy", "blind_choice", "twin_one_hidden", "twin_one_example",
          "twin_hidden", "twin_sum", "soft_easy", "notch_check")
probe_small = 60


EXTRAS = "pretrain-extras.safetensors"


def with_hidden_rows(pt: MiniPretrainer) -> LlavaForConditionalGeneration:
    """The model to ship: the notch's hidden rows appended as input rows no tokenizer string reaches
    (ids len(tokenizer)..+3; their output rows are zero and decoding never emits them)."""
    model = copy.deepcopy(pt.model)
    V, n = len(pt.backbone.tokenizer), pt.hidden_rows.shape[0]
    model.resize_token_embeddings(V + n, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[V:] = pt.hidden_rows
        model.get_output_embeddings().weight[V:] = 0
    return model


def save(pt: MiniPretrainer, out: Path, result: dict) -> None:
    """The LLaVA weights (HF layout, hidden rows included) and, apart, what only the probes need
    (placeholder-name rows, the vision and readout heads, the hidden rows again)."""
    save_mini(with_hidden_rows(pt), out)
    extras = {k: v.detach().contiguous() for k, v in pt.state_dict().items() if not k.startswith("model.")
              and not k.startswith("backbone.") and not k.startswith("lm.")}
    save_file(extras, str(out / EXTRAS))
    (out / "pretrain.json").write_text(json.dumps(result, indent=2))


def load_pretrainer(folder: Path = WEIGHTS, strict: bool = True) -> MiniPretrainer:
    """A pretrainer holding saved weights: to re-run the card's probes (or warm-start)."""
    pt = MiniPretrainer()
    state = LlavaForConditionalGeneration.from_pretrained(folder).state_dict()
    V = len(pt.backbone.tokenizer)
    hidden = state["model.language_model.embed_tokens.weight"][V:]  # (4, d), or none in an older base
    for k in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        state[k] = state[k][:V]  # the pretrainer keeps the hidden rows apart (a frozen buffer)
    pt.model.load_state_dict(state)
    missing, unexpected = pt.load_state_dict(load_file(str(folder / EXTRAS)), strict=False)
    bad = [k for k in missing if not k.startswith(("model.", "backbone.", "lm."))]
    if strict and (unexpected or bad):
        raise ValueError(f"{folder / EXTRAS}: unexpected {unexpected}, missing {bad}")
    if bad:
        log.info("warm start: new %s", bad)
    if len(hidden) and not torch.equal(hidden, pt.hidden_rows):
        raise ValueError(f"{folder}: the model's hidden rows differ from those in {EXTRAS}")
    return pt


def train(steps: int, batch: int, lr: float, seed: int, out: Path | None, probe_every: int,
          ramp: float = 0.4, probe_n: int = 400, gated: bool = False, stop_at: int | None = None,
          init: Path | None = None, curriculum: str = "base", warmup: int = 200) -> dict:
    """`steps` optimizer steps of `batch` tasks; reproducible: the schedule depends on the step,
    and with `gated` on deterministic probes (each stage of `STAGES` until its probe passes).
    `stop_at` ends the run after that step of the `steps`-long schedule."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pt = load_pretrainer(init, strict=False) if init else MiniPretrainer(seed)
    pt.model.requires_grad_(True)
    pt.model.train()
    stages = CURRICULA[curriculum]
    opt = torch.optim.AdamW(pt.parameters(), lr=lr, weight_decay=0.01)
    history: list[dict] = []
    last = min(stop_at or steps, steps)
    result = {"steps": steps, "stop_at": last, "probe_every": probe_every, "batch": batch, "lr": lr, "seed": seed,
              "ramp": ramp, "gated": gated, "curriculum": curriculum, "warmup": warmup, "history": history,
              "stages": []}
    if init is not None:  # provenance: the run this one started from
        parent = json.loads((init / "pretrain.json").read_text())
        result["init"] = {"from": str(init), "command": command(parent), "steps": parent.get("stop_at"),
                          "minutes": parent.get("minutes"), "init": parent.get("init")}
    stage = 0
    t0 = time.time()
    for step in tqdm(range(1, last + 1), desc="pretraining", unit="step", mininterval=10):
        frac = step / steps
        for g in opt.param_groups:  # warm-up, then cosine to a tenth
            g["lr"] = lr * min(1.0, step / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        mix = stages[stage][0] if gated else mix_at(frac, ramp)
        tasks = [sample_task(rng, mix) for _ in range(batch)]
        losses = pt.loss(tasks)
        total = losses["lm"] + losses["aux"] + losses["align"] + 0.5 * losses["readout"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(pt.parameters(), 1.0)
        opt.step()
        if probe_every and step % probe_every == 0:
            acc = pt.probe(PROBES, n=probe_small)
            history.append({"step": step, "minutes": round((time.time() - t0) / 60, 1), **acc,
                            **{k: round(float(v.detach()), 4) for k, v in losses.items()}})
            log.info("step %d %s", step, history[-1])
            gate = stages[stage][1:] if gated else (None, None)
            if gate[0] is not None and acc[gate[0]] >= gate[1]:
                stage += 1
                result["stages"].append(step)
                log.info("step %d: %s %.2f >= %.2f, stage %d", step, gate[0], acc[gate[0]], gate[1], stage)
            if out is not None:  # a checkpoint to look at while the run goes on
                save(pt, out, result)
    result["probe"] = pt.probe(PROBES, n=probe_n)
    result["minutes"] = round((time.time() - t0) / 60, 1)
    if out is not None:
        save(pt, out, result)
        (out / "README.md").write_text(card(result))
    return result


PROBE_TEXT = {
    "single_check": "is the only object red / a circle / striped? (yes/no)",
    "existence": "is there a red striped circle / a circle / a red object in this photo? (yes/no)",
    "attribute": "what colour / shape / pattern is the ...? (among all values)",
    "counting": "how many objects are in this photo? (one to six)",
    "naming_words": "`<n> is <latents = the words' embeddings>.` is <n> in this photo?",
    "naming_text": "`<sks> is a red plain circle.` in an earlier turn; is <sks> in this photo?",
    "naming_example": "`<n> is <latents = image tokens of the object in 1-16 photos>.` is <n> here?",
    "naming_notch": "as naming_example, every negative the same object but for the notch",
    "naming_easy": "as naming_example, every negative a random other object",
    "blind_choice": "text only: what colour is <n>? a. red b. blue (the evaluation's QA form)",
    "notch_check": "`<n> is a object <hidden row of a corner>.` one object: is <n> here? (its notch)",
    "twin_one_hidden": "`<n> is <words + the notch's hidden row>.` one object; every negative its twin",
    "twin_one_example": "as naming_example, one object; every negative its twin",
    "twin_hidden": "`<n> is <words + the notch's hidden row>.` 1-4 objects; every negative its twin",
    "twin_sum": "`<n> is <one row: words + hidden row, summed>.` 1-4 objects; every negative its twin",
    "soft_easy": "words + hidden row, or summed; fillers and noise; negatives other objects",
}


def command(result: dict) -> str:
    args = f"--steps {result['steps']} --batch {result['batch']} --lr {result['lr']} --seed {result['seed']}"
    if result.get("stop_at", result["steps"]) != result["steps"]:
        args += f" --stop-at {result['stop_at']}"
    if result.get("init"):
        args += f" --init {result['init']['from']}"
    if result.get("curriculum", "base") != "base":
        args += f" --curriculum {result['curriculum']}"
    if result.get("warmup", 200) != 200:
        args += f" --warmup {result['warmup']}"
    if result.get("gated"):
        return args + f" --gated --probe-every {result.get('probe_every', 250)}"
    return args + f" --ramp {result.get('ramp', 0.4)} --probe-every {result.get('probe_every', 500)}"


def schedule(result: dict) -> str:
    if result.get("gated"):
        stages = ", ".join(f"stage {i + 1} at step {s}" for i, s in enumerate(result.get("stages", [])))
        return ("Gated curriculum (`STAGES` in tasks.py): readouts of the only object and single "
                "comparisons until the comparison probe passes 0.9; then positions, attributes and "
                "existence until existence passes 0.85; then everything, names weighted up, until "
                f"names bound by words pass 0.85; then the full mix ({stages or 'no stage passed'}).")
    return (f"The task mix moves from readouts and single comparisons to the full mix over the first "
            f"{int(100 * result.get('ramp', 0.4))}% of the steps.")


CURRICULUM_TEXT = {
    "base": "readouts of the only object and single comparisons until the comparison probe passes 0.9, then "
            "positions, attributes and existence until existence passes 0.85, then everything with names weighted "
            "up until names bound by words pass 0.85, then the full mix;",
    "notch": "the notch's single comparison (`notch_check`: `<n> is a object <hidden row>.`, one object) until "
             "0.9, then one-object naming against twins until 0.85, then the soft mix;",
    "soft": "the soft mix only: existence, attributes, counting, captions, names bound by words (as concept rows "
            "or as text), by example photos (image tokens) and by soft rows (words + the hidden row, summed rows; "
            "with filler rows drawn like personalization's start, and noise), twins as distractors, the notch's "
            "comparisons, text-only attribute and two-option questions;",
    "naming": "the soft mix with naming by example photos weighted up (and its form where every negative is a "
              "twin), for a base whose bound is that kind;",
    "binding": "the naming mix with attributes of one object among several (find the object by one attribute, "
               "read another) and `binding` added: every object's asked attribute, each said right after its "
               "key (`circle red, square blue.`, random order), the first of the two hops alone;",
    "attributes": "a quarter of the naming mix, with attributes of one object among several weighted to half "
                  "of the questions and `binding` kept, for a base that has the first hop (then both hops).",
}
TARGETS = {"existence": 0.95, "attribute": 0.95, "naming_example": 0.9, "naming_notch": 0.8, "twin_hidden": 0.8}


def shortfall(probe: dict) -> str:
    short = [f"{k} {probe.get(k, float('nan')):.3f} (target {t})" for k, t in TARGETS.items() if not probe.get(k, 0) >= t]
    met = [f"{k} {probe[k]:.3f}" for k, t in TARGETS.items() if probe.get(k, 0) >= t]
    return (f"Met: {', '.join(met) or 'none'}. " if met else "") + \
        (f"Short: {', '.join(short)}." if short else "All targets are met.")


def provenance(result: dict) -> str:
    """The commands that made these weights, oldest first."""
    chain, r = [], result
    while r is not None:
        chain.append(r)
        r = r.get("init") if isinstance(r.get("init"), dict) else None
    lines, chain = [], chain[::-1]  # oldest first; each earlier stage saved where the next one starts from
    for i, r in enumerate(chain, start=1):
        cmd = r["command"] if "command" in r else command(r)
        if i < len(chain):
            cmd += f" --out {chain[i]['init']['from']}"
        what = "from random weights" if i == 1 else "warm start from the previous stage's weights"
        code = f", the base shipped at commit {r['commit']}" if r.get("commit") else ""
        steps = r.get("stop_at", r.get("steps", "?")) if i == len(chain) else r.get("steps", r.get("stop_at", "?"))
        lines.append(f"{i}. {what} ({steps} steps, {r.get('minutes', '?')} "
                     f"min on one CPU core{code}):\n\n       OMP_NUM_THREADS=1 python -m miniworld.pretrain {cmd}")
    return "\n\n".join(lines)


def card(result: dict) -> str:
    """The model card: how the weights were made and what they measure on held-out probes."""
    rows = "\n".join(f"| {k} | {result['probe'][k]:.3f} | {PROBE_TEXT.get(k, '')} |" for k in result["probe"])
    cols = ("existence", "attribute", "naming_example", "naming_notch", "twin_one_hidden", "twin_hidden")
    curve = "\n".join(f"| {h['step']} | " + " | ".join(f"{h.get(k, float('nan')):.2f}" for k in cols)
                      + f" | {h['lm']:.3f} |" for h in result.get("history", [])[1::2])
    stages = ", ".join(f"stage {i + 1} at step {s}" for i, s in enumerate(result.get("stages", [])))
    _V = len(build_mini_tokenizer())
    return f"""# The miniature LLaVA (`--model mini`)

A real `LlavaForConditionalGeneration` (CLIP vision tower 3 layers x 128, patch 16
on 48x48 photos = one image token per cell of the world's 3x3 grid; projector;
Llama 4 layers x 256, 8 heads) with a word-level tokenizer (`miniworld/model.py`),
pretrained from random initialisation on the miniature world (`miniworld/world.py`,
`tasks.py`). It is the project's one-machine default model and the oracle of its
end-to-end tests. Its weights are only good for this world.

The notch (a dark corner mark) has no word. Like a real LLM that represents many
visual details it has no single word for, this model has **latent rows** for it:
{len(world.NOTCHES)} input rows (ids {_V}..{_V + len(world.NOTCHES) - 1} of the embedding, one per corner) that no
tokenizer string reaches; frozen, orthogonal, at word-embedding scale; their
output rows are zero and decoding never emits them. Image tokens are aligned to
`shape + colour + pattern words + the notch's row`, and names bound through
concept rows use them, so a concept trained by gradient can point at the notch;
a description in words cannot.

## How it was made

{provenance(result)}

The last stage: {result.get('stop_at', result['steps'])} AdamW steps (of a {result['steps']}-step cosine schedule)
of {result['batch']} questions (one scene each), all weights trained. Losses: each question's mean answer-token
cross-entropy; per-patch heads on the vision tower (shape, colour, pattern, notch or empty of each cell);
image tokens pulled towards their cell's word embeddings plus the notch's hidden row; linear readouts of
every attribute, notch included, from the language model's middle layer at image tokens and at each
definition's last latent row. The curricula (`--gated`): {" ".join(f"`{k}`, {v}" for k, v in CURRICULUM_TEXT.items())}{' Stages of the last run: ' + stages + '.' if stages else ''}
`pretrain-extras.safetensors` holds what only the probes use (placeholder-name rows, the heads, the hidden rows).

## Held-out accuracy of the base (before any personalization)

400 questions per kind, drawn with seed 12345 (`MiniPretrainer.probe`), scored by
the likeliest candidate answer. Chance: 0.5 for yes/no kinds, 1/3-1/6 for attributes.

| probe | accuracy | question |
|---|---|---|
{rows}

## Against the targets

Targets: {', '.join(f'{k} >= {t}' for k, t in TARGETS.items())}. {shortfall(result['probe'])}

## Training curve of the last stage (probes of 60 questions)

| step | {' | '.join(cols)} | LM loss |
|---|{'---|' * len(cols)}---|
{curve}
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="pretrain the miniature LLaVA")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ramp", type=float, default=0.4, help="share of the steps over which the mix moves "
                    "from readouts to the full curriculum")
    ap.add_argument("--stop-at", type=int, default=None, help="end after this step of the --steps schedule")
    ap.add_argument("--gated", action="store_true", help="stages gated on probe accuracy instead of the ramp")
    ap.add_argument("--probe-every", type=int, default=500)
    ap.add_argument("--out", default=str(WEIGHTS))
    ap.add_argument("--card", action="store_true", help="only rewrite OUT/README.md from OUT/pretrain.json")
    ap.add_argument("--probe", action="store_true", help="only measure OUT's held-out probes (--probe-n per kind) "
                    "into OUT/pretrain.json and rewrite its card: for a checkpoint saved mid-run")
    ap.add_argument("--init", default=None, help="warm-start from this saved folder")
    ap.add_argument("--curriculum", default="base", choices=sorted(CURRICULA),
                    help="with --gated: base (from random weights), notch (the notch stages, then the full mix), "
                         "soft (the full mix only, to continue a base that passed the notch stages), "
                         "naming (the soft mix, naming by example weighted up), binding (the naming mix with one-hop "
                         "binding added), attributes (attributes among several objects weighted to half)")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--probe-n", type=int, default=400)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.card or args.probe:
        out = Path(args.out)
        result = json.loads((out / "pretrain.json").read_text())
        if args.probe:
            result["probe"] = load_pretrainer(out).probe(PROBES, n=args.probe_n)
            (out / "pretrain.json").write_text(json.dumps(result, indent=2))
            print(json.dumps(result["probe"]))
        (out / "README.md").write_text(card(result))
        return 0
    result = train(args.steps, args.batch, args.lr, args.seed, Path(args.out) if args.out else None,
                   args.probe_every, args.ramp, probe_n=args.probe_n, gated=args.gated, stop_at=args.stop_at,
                   init=Path(args.init) if args.init else None, curriculum=args.curriculum, warmup=args.warmup)
    print(json.dumps(result["probe"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
