"""mlx-gemma: Gemma 4 12B (gemma4_unified) on Apple's MLX.

    from mlx_gemma import load, generate
    model, processor = load("google/gemma-4-12B-it")
    print(generate(model, processor, "Why is the sky blue?"))
"""

from .errors import MlxGemmaError

__all__ = ["load", "load_drafter", "generate", "stream_generate", "MlxGemmaError"]
__version__ = "0.1.0"


def __getattr__(name):
    # Imported on first use: `import mlx_gemma` stays light.
    if name == "load":
        from .loading import load

        return load
    if name == "load_drafter":
        from .speculative import load_drafter

        return load_drafter
    if name in ("generate", "stream_generate"):
        from . import generation

        return getattr(generation, name)
    raise AttributeError(f"module 'mlx_gemma' has no attribute {name!r}")
