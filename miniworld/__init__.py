"""A miniature procedural world and a miniature LLaVA trained on it (the `mini` backbone)."""
