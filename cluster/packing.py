"""Packs: which subjects train together on one worker, and which worker trains which pack."""

from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")


def make_packs(subjects: Sequence[T], pack_size: int, name=lambda s: s.name) -> list[list[T]]:
    """Subjects in order, `pack_size` per pack, no concept name twice in a pack.

    The packed trainer keys a pack's subjects by concept name, so two owners'
    `<bo>` go to different packs. First fit keeps packs full and order stable.
    """
    if pack_size < 1:
        raise ValueError(f"pack_size={pack_size} must be >= 1")
    packs: list[list[T]] = []
    names: list[set[str]] = []
    for s in subjects:
        for pack, used in zip(packs, names):
            if len(pack) < pack_size and name(s) not in used:
                pack.append(s)
                used.add(name(s))
                break
        else:
            packs.append([s])
            names.append({name(s)})
    return packs


def packs_of_rank(packs: Sequence[T], rank: int, world: int) -> list[T | None]:
    """Rank r's packs r, r+W, ... padded with None to the same number of rounds for every rank.

    Every worker calls `ray.train.report` once per round (it is a barrier), so
    all ranks need the same number of rounds even when packs do not divide evenly.
    """
    rounds = -(-len(packs) // world) if packs else 0
    mine: list[T | None] = list(packs[rank::world])
    return mine + [None] * (rounds - len(mine))
