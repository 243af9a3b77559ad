"""WSI-LLaVA: whole-slide pathology features to a slide-level chat assistant."""

__version__ = "0.1.0"
