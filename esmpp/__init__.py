"""esmpp: merge fine-tuned CLIP vision encoders with Essential Subspace Merging and ESM++ routing."""

__version__ = "0.1.0"
