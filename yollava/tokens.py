"""Concept token strings: one identifier `<bo>` and k latent tokens `<bo_1>`…`<bo_k>`."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Owner and concept names: safe as path parts, URL parts and token text.
NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,63}"
NAME_RE = re.compile(rf"^{NAME_PATTERN}$")
DEFAULT_NUM_LATENT = 16


def check_name(value: str, field: str = "name") -> str:
    """Return `value` if it is a valid owner/concept name, else raise naming the field."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ValueError(
            f"{field}={value!r} is not a valid name: use 1-64 characters from "
            "a-z, 0-9, '-' and '_', starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class ConceptTokens:
    """The token strings of one subject.

    `display` is how the identifier is written in prompts and decoded output
    (`<bo>`, or `<alice/bo>` for a concept another owner shared).
    """

    name: str
    num_latent: int = DEFAULT_NUM_LATENT
    display: str | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        if not 1 <= self.num_latent <= 256:
            raise ValueError(f"num_latent={self.num_latent} must be in 1..256")

    @property
    def num_tokens(self) -> int:
        """Identifier + latents: the number of rows in `embed` and `head`."""
        return self.num_latent + 1

    @property
    def identifier(self) -> str:
        return f"<{self.display or self.name}>"

    @property
    def latents(self) -> list[str]:
        return [f"<{self.name}_{i}>" for i in range(1, self.num_latent + 1)]

    @property
    def strings(self) -> list[str]:
        """All token strings, in row order (identifier first)."""
        return [f"<{self.name}>", *self.latents]

    def definition(self) -> str:
        """The paper's definition sentence: `<bo> is <bo_1><bo_2>…<bo_k>.`"""
        return f"{self.identifier} is {''.join(self.latents)}."
