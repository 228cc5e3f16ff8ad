"""The packed multi-subject trainer: many subjects per step on one frozen backbone.

Each subject owns one (embed, head) parameter pair in a `ConceptBank`. A step
holds `batch_size` samples of every subject still in its epoch; the loss is the
sum over subjects of each subject's mean answer-token cross-entropy, so a
subject's gradient does not depend on which other subjects share its step,
and a subject absent from a step has no gradient, hence no AdamW update and no
weight decay.

Frozen work is done once: projected image features are cached per photo and
flip; within a step, the prefix every subject shares (system prompt + photo)
is run once per distinct photo without grad, and its KV cache reused.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from yollava.backbone import Backbone
from yollava.batching import pad
from yollava.concept_model import ConceptLM, ConceptRows, ConceptTable
from yollava.features import ByteLRU, FeatureCache, ImageLoader
from yollava.prompt import IGNORE_INDEX, Encoded, PromptEncoder
from yollava.recipe import PhotoRef, RecipeConfig, Sample, TrainingSet
from yollava.scoring import says_yes, score_rows
from yollava.templates import RECOGNITION_EVAL_QUESTION
from yollava.tokens import ConceptTokens

log = logging.getLogger(__name__)
InitStats = tuple[Tensor, Tensor, Tensor, Tensor]  # mean embed row (d,), its spread (), mean head row, spread


class ConceptBank(nn.Module):
    """One (embed, head) parameter pair per subject, (k+1, d) each, fp32."""

    def __init__(self, backbone: Backbone, seed: int = 0):
        self._setup(self.init_stats(backbone), seed)

    @classmethod
    def from_stats(cls, stats: InitStats, seed: int = 0) -> "ConceptBank":
        """A bank initialised from statistics of the base rows taken earlier (e.g. before
        ZeRO-3 sharded the weights, when they can no longer be read whole)."""
        bank = cls.__new__(cls)
        bank._setup(stats, seed)
        return bank

    @staticmethod
    def init_stats(backbone: Backbone) -> InitStats:
        """What new concepts start from: the mean base rows and their spread."""
        w_e = backbone.embed_tokens.weight.detach().float()
        w_h = backbone.lm_head.weight.detach().float()
        return w_e.mean(0), w_e.std(0).mean(), w_h.mean(0), w_h.std(0).mean()  # (d,), (), (d,), ()

    def _setup(self, stats: InitStats, seed: int) -> None:
        nn.Module.__init__(self)
        self.embed = nn.ParameterDict()
        self.head = nn.ParameterDict()
        self.tokens: dict[str, ConceptTokens] = {}
        self.seed = seed
        self._init = stats

    def add(self, name: str, num_latent: int, rows: ConceptRows | None = None,
            latents: Tensor | None = None) -> None:
        """A new subject: from `rows` (resume), or near the mean base row, seeded by name, with
        the first latent input rows taken from `latents` (m <= k, d) when given (the rest stay
        near the mean row)."""
        tokens = ConceptTokens(name, num_latent)
        if rows is None:
            g = torch.Generator().manual_seed(_stable_seed(f"{self.seed}:{name}"))
            mu_e, sd_e, mu_h, sd_h = self._init
            n, d = tokens.num_tokens, mu_e.shape[0]
            embed = mu_e + 0.1 * sd_e * torch.randn(n, d, generator=g)
            head = mu_h + 0.1 * sd_h * torch.randn(n, d, generator=g)
            if latents is not None:
                if latents.dim() != 2 or not 1 <= latents.shape[0] <= num_latent or latents.shape[1] != d:
                    raise ValueError(f"latents for {name!r} have shape {tuple(latents.shape)}; "
                                     f"expected (m, {d}) with 1 <= m <= {num_latent}")
                embed[1:1 + latents.shape[0]] = latents.detach().float().to(embed.device)
        else:
            embed, head = rows.embed.detach().float(), rows.head.detach().float()
        dev = self._init[0].device
        self.embed[name] = nn.Parameter(embed.clone().to(dev))
        self.head[name] = nn.Parameter(head.clone().to(dev))
        self.tokens[name] = tokens

    def rows(self, name: str) -> ConceptRows:
        return ConceptRows(self.tokens[name], self.embed[name], self.head[name])

    def snapshot(self, name: str) -> ConceptRows:
        return ConceptRows(self.tokens[name], self.embed[name].detach().clone(),
                           self.head[name].detach().clone())


class PrefixCache:
    """Prefix KV per photo, kept across steps up to a byte budget (LRU).

    The prefix (system prompt + photo) depends only on frozen weights and the
    photo, so a photo's keys and values never change during training. A photo
    not cached (budget 0, or evicted) is recomputed in the step that needs it.
    """

    def __init__(self, budget_mb: int):
        self._kv: ByteLRU[PhotoRef, list[tuple[Tensor, Tensor]]] = ByteLRU(budget_mb * 2**20)
        self.computed = 0

    @property
    def used(self) -> int:
        return self._kv.used

    def cache_for(self, refs: Sequence[PhotoRef], template: Encoded, trainer: "PackedTrainer") -> DynamicCache:
        """A cache of B rows, row b holding the prefix of photo refs[b]."""
        unique = list(dict.fromkeys(refs))
        missing = [r for r in unique if r not in self._kv]
        fresh = dict(zip(missing, _split_rows(trainer.prefix_kv(missing, template)))) if missing else {}
        self.computed += len(missing)
        per_photo = {r: fresh[r] if r in fresh else self._kv.get(r) for r in unique}
        for r, kv in fresh.items():
            self._kv.put(r, kv)
        cache = DynamicCache()
        for layer in range(len(per_photo[unique[0]])):
            k = torch.cat([per_photo[r][layer][0] for r in refs])  # (B, h, P, dh)
            v = torch.cat([per_photo[r][layer][1] for r in refs])
            cache.update(k, v, layer)
        return cache


def _split_rows(kv: list[tuple[Tensor, Tensor]]) -> list[list[tuple[Tensor, Tensor]]]:
    """Per layer (U, ...) -> per photo, per layer (1, ...)."""
    U = kv[0][0].shape[0]
    return [[(k[u:u + 1], v[u:u + 1]) for k, v in kv] for u in range(U)]


@dataclass
class SubjectResult:
    name: str
    rows: ConceptRows
    best_epoch: int
    metrics: dict
    history: list[dict] = field(default_factory=list)


@dataclass
class _Item:
    sample: Sample
    enc: Encoded


class PackedTrainer:
    def __init__(self, backbone: Backbone, config: RecipeConfig, load_image: ImageLoader,
                 share_prefix: bool = True, progress: bool = True, prefix_cache_mb: int = 1024,
                 micro_batch: int = 0, feature_cache_mb: int = 2048):
        self.backbone, self.config = backbone, config
        self.lm = ConceptLM(backbone)
        self.encoder = PromptEncoder.for_backbone(backbone)
        self.features = FeatureCache(backbone, load_image, budget_mb=feature_cache_mb)
        self.share_prefix = share_prefix
        self.micro_batch = micro_batch  # rows per forward/backward; 0 = the whole step at once
        self.prefixes = PrefixCache(prefix_cache_mb)
        self.progress = progress

    # -- one step -------------------------------------------------------------------------
    def step_loss(self, items: Sequence[_Item], bank: ConceptBank) -> dict[str, Tensor]:
        """Mean answer-token cross-entropy of each subject present in `items` (one graph)."""
        counts = _answer_tokens(items)
        losses: dict[str, Tensor] = {}
        for chunk in self._chunks(items, micro_batch=0):
            for subject, loss in self._chunk_losses(chunk, bank, counts).items():
                losses[subject] = losses[subject] + loss if subject in losses else loss
        return losses

    def step_backward(self, items: Sequence[_Item], bank: ConceptBank) -> dict[str, float]:
        """Backward of the step's loss, `micro_batch` rows at a time; returns each subject's loss.

        Each chunk's share is its tokens' summed loss over the subject's token
        count in the whole step, so the accumulated gradient equals the
        one-graph gradient of `step_loss` while only a chunk's activations live.
        """
        counts = _answer_tokens(items)
        totals: dict[str, float] = {}
        for chunk in self._chunks(items, self.micro_batch):
            losses = self._chunk_losses(chunk, bank, counts)
            sum(losses.values()).backward()
            for subject, loss in losses.items():
                totals[subject] = totals.get(subject, 0.0) + loss.item()
        return totals

    def _chunks(self, items: Sequence[_Item], micro_batch: int) -> list[list[_Item]]:
        """Photo rows and text rows apart (they run differently), each cut to micro_batch rows."""
        groups = [[it for it in items if it.sample.photo is not None],
                  [it for it in items if it.sample.photo is None]]
        size = micro_batch or len(items)
        return [g[i:i + size] for g in groups for i in range(0, len(g), size)]

    def _chunk_losses(self, chunk: Sequence[_Item], bank: ConceptBank,
                      counts: dict[str, int]) -> dict[str, Tensor]:
        photo = chunk[0].sample.photo is not None
        run = self._photo_rows_shared if photo and self.share_prefix else self._rows_full
        logp = run(chunk, bank)  # (B,) summed answer log-probs per row
        out: dict[str, Tensor] = {}
        for b, it in enumerate(chunk):
            s = it.sample.subject
            part = -logp[b] / counts[s]
            out[s] = out[s] + part if s in out else part
        return out

    def _rows_full(self, items: Sequence[_Item], bank: ConceptBank) -> Tensor:
        """Whole sequences, no sharing -> (B,) per-row answer log-prob sums."""
        refs = [it.sample.photo for it in items if it.sample.photo is not None]
        feats = self.features.get(refs) if refs else None
        return score_rows(self.lm, [it.enc for it in items], [[bank.rows(it.sample.subject)] for it in items],
                          feats)

    def _photo_rows_shared(self, items: Sequence[_Item], bank: ConceptBank) -> Tensor:
        """Prefix (system + photo) once per distinct photo, then every row's suffix -> (B,)."""
        P = items[0].enc.prefix_len
        if any(it.enc.prefix_len != P or it.enc.ids[:P] != items[0].enc.ids[:P] for it in items):
            raise ValueError("photo samples of one step must share the prefix layout")
        if any(any(it.enc.image_mask[P:]) for it in items):
            raise ValueError("a photo after the concept definition cannot share the prefix")
        cache = self.prefixes.cache_for([it.sample.photo for it in items], items[0].enc, self)  # (B, ...)
        return score_rows(self.lm, [it.enc for it in items], [[bank.rows(it.sample.subject)] for it in items],
                          start=P, cache=cache)

    @torch.no_grad()
    def prefix_kv(self, refs: Sequence[PhotoRef], template: Encoded) -> list[tuple[Tensor, Tensor]]:
        """Keys and values of the shared prefix for each photo: per layer ((U, h, P, dh), (U, h, P, dh))."""
        P = template.prefix_len
        prefix = pad([_truncate(template, P)] * len(refs), device=self.backbone.device)
        empty = ConceptTable.build([[]] * len(refs), self.backbone.hidden_size, self.backbone.dtype,
                                   self.backbone.device)
        x = self.lm.embed(prefix.ids, empty, self.features.get(refs), prefix.image_mask)
        _, cache = self.lm.hidden(x, prefix.mask, use_cache=True)
        return [(layer.keys, layer.values) for layer in cache.layers]

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, sets: Sequence[TrainingSet], bank: ConceptBank | None = None,
            on_epoch: Callable[[int, dict], None] | None = None) -> dict[str, SubjectResult]:
        cfg = self.config
        bank = bank or ConceptBank(self.backbone, seed=cfg.seed)
        for ts in sets:
            if ts.subject not in bank.tokens:
                bank.add(ts.subject, cfg.num_latent, latents=self._initial_latents(ts))
        opt = torch.optim.AdamW([{"params": list(bank.embed.values())},
                                 {"params": list(bank.head.values()), "lr": cfg.lr * cfg.head_lr_scale}],
                                lr=cfg.lr, weight_decay=cfg.weight_decay)
        items = {ts.subject: [self._item(s) for s in ts.train] for ts in sets}
        best: dict[str, SubjectResult] = {}
        steps_per_epoch = max(-(-len(v) // cfg.batch_size) for v in items.values())
        bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"training {len(sets)} subject(s)",
                   disable=not self.progress, unit="step")
        for epoch in range(1, cfg.epochs + 1):
            t0, sums = time.perf_counter(), {s: [] for s in items}
            for step_items in self._epoch_steps(items, epoch):
                opt.zero_grad(set_to_none=True)
                losses = self.step_backward(step_items, bank)
                opt.step()
                for s, l in losses.items():
                    sums[s].append(l)
                bar.update(1)
            report = self._end_epoch(epoch, sets, bank, sums, best)
            bar.set_postfix(loss=round(sum(r["loss"] for r in report.values()) / len(report), 4),
                            s=round(time.perf_counter() - t0, 1))
            if on_epoch:
                on_epoch(epoch, report)
        bar.close()
        return best

    def _initial_latents(self, ts: TrainingSet) -> Tensor | None:
        """recipe.init == "photos": the subject's recurring image tokens (set against its negatives'
        photos), one per training photo, for the first min(k, photos) rows; rows past the photos keep
        the mean-row start (repeating a photo's token made two rows start identical: at k 16 with 8
        photos, dev subjects 0.76 / 0.82 weighted against 0.84 / 0.85 with the rest at the mean row)."""
        if self.config.init != "photos":
            return None

        def photos(kind: str) -> list[PhotoRef]:  # each photo once, in order, flips dropped
            return list(dict.fromkeys(PhotoRef(s.photo.key) for s in ts.train + ts.holdout
                                      if s.kind == kind and s.photo is not None))

        refs, negatives = photos("positive"), photos("negative")
        if not refs:
            raise ValueError(f"init='photos' needs training photos; subject {ts.subject!r} has none")
        background = self.features.get(negatives).float() if negatives else None  # (B, n_img, d)
        tokens = recurring_tokens(self.features.get(refs).float(), background)  # (P, d)
        return tokens[:self.config.num_latent]  # (min(k, P), d)

    def _item(self, s: Sample) -> _Item:
        return _Item(s, self.encoder.encode(s.messages, [ConceptTokens(s.subject, self.config.num_latent)]))

    def _epoch_steps(self, items: dict[str, list[_Item]], epoch: int):
        """Each subject's samples shuffled by its own seed, `batch_size` of each per step."""
        order = {}
        for s, its in items.items():
            its = its[:]
            random.Random(f"{self.config.seed}:{s}:{epoch}").shuffle(its)
            order[s] = its
        bs = self.config.batch_size
        n = max(len(v) for v in order.values())
        for i in range(0, n, bs):
            step = [it for v in order.values() for it in v[i:i + bs]]
            if step:
                yield step

    def _end_epoch(self, epoch, sets, bank, sums, best) -> dict[str, dict]:
        report = {}
        for ts in sets:
            metrics = {"epoch": epoch, "loss": sum(sums[ts.subject]) / max(1, len(sums[ts.subject]))}
            if ts.holdout:
                metrics.update(self.holdout_accuracy(ts, bank.rows(ts.subject)))
            prev = best.get(ts.subject)
            score = metrics.get("weighted", -metrics["loss"])
            if prev is None or score >= prev.metrics.get("weighted", -prev.metrics["loss"]):
                best[ts.subject] = SubjectResult(ts.subject, bank.snapshot(ts.subject), epoch, metrics,
                                                 prev.history if prev else [])
            best[ts.subject].history.append(metrics)
            report[ts.subject] = metrics
        return report

    @torch.no_grad()
    def holdout_accuracy(self, ts: TrainingSet, rows: ConceptRows) -> dict[str, float]:
        """Recognition on held-out samples by log p("Yes") against log p("No")."""
        hits = {"positive": [], "negative": []}
        q = RECOGNITION_EVAL_QUESTION.format(c=f"<{ts.subject}>")
        for s in ts.holdout:
            yes, _ = says_yes(self.lm, self.encoder, q, [rows], self.features.get([s.photo]))
            hits[s.kind].append(yes == (s.kind == "positive"))
        out = {f"{k}_acc": sum(v) / len(v) for k, v in hits.items() if v}
        accs = list(out.values())
        out["weighted"] = sum(accs) / len(accs)
        return out


def recurring_tokens(features: Tensor, background: Tensor | None = None, chunk: int = 16) -> Tensor:
    """The image token of each photo that recurs across the others and not in photos without the
    subject: (P, n_img, d), background (B, n_img, d) -> (P, d).

    A subject appears in every training photo, its surroundings change: score token i of photo p by
    its best match in each other photo (mean over photos of the max cosine), less its best match in
    each background photo. Without the second term, whatever every photo shows scores as well: an
    empty cell's token is the same in all of them (cosine 1.0, as the subject's own), and the tie
    went by rounding or index; on the miniature bases 24 (stage 4) and 31 (the binding base) of the
    six sample subjects' 48 rows started at another cell. With one photo, its mean token.
    """
    P = features.shape[0]
    if P == 1:
        return features.mean(1)
    unit = torch.nn.functional.normalize(features, dim=-1)  # (P, n, d)
    sims = torch.einsum("pid,qjd->pqij", unit, unit).amax(-1)  # (P, P, n): best match of p's token i in q
    score = sims.masked_fill(torch.eye(P, dtype=torch.bool).unsqueeze(-1), 0).sum(1) / (P - 1)  # (P, n)
    if background is not None and len(background):
        bg = torch.nn.functional.normalize(background.to(unit.dtype), dim=-1)  # (B, n', d)
        seen = torch.zeros_like(score)
        for b in bg.split(chunk):  # (c, n', d): bounds the (P, c, n, n') similarities
            seen += torch.einsum("pid,bjd->pbij", unit, b).amax(-1).sum(1)
        score = score - seen / len(bg)
    best = score.argmax(-1)  # (P,)
    return features[torch.arange(P), best]


def _answer_tokens(items: Sequence[_Item]) -> dict[str, int]:
    """Trained (labelled) tokens per subject in a step."""
    counts: dict[str, int] = {}
    for it in items:
        n = sum(1 for label in it.enc.labels[1:] if label != IGNORE_INDEX)
        counts[it.sample.subject] = counts.get(it.sample.subject, 0) + n
    return counts


def _truncate(enc: Encoded, n: int) -> Encoded:
    return Encoded(enc.ids[:n], enc.image_mask[:n], [IGNORE_INDEX] * n, enc.num_images, n, [])


def _stable_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
