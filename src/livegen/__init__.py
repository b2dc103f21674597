"""livegen: self-hosted real-time image generation speaking fal.ai's model API protocol."""

__version__ = "0.1.0"
