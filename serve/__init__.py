"""Ray Serve chat: one shared LLaVA, every tenant's concepts, an OpenAI-compatible API."""
