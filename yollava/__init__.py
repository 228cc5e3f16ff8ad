"""Yo'LLaVA: personalize a frozen LLaVA-family model with a few concept tokens.

Pure PyTorch + transformers: no Ray, no S3, no HTTP in this package.
"""

__version__ = "0.1.0"
