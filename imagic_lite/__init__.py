"""imagic-lite: Imagic (Kawar et al., CVPR 2023) real-image editing on the GPU people own.

The public API is `Imagic` (imagic_lite.api); the three stages live in imagic_lite.imagic.
"""

__version__ = "0.1.0"

__all__ = ["Imagic", "__version__"]


def __getattr__(name: str):
    # Lazy: `import imagic_lite` (and `imagic-lite --help`) must not import torch.
    if name == "Imagic":
        from .api import Imagic

        return Imagic
    raise AttributeError(name)
