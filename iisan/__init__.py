"""iisan: IISAN / IISAN-Versa decoupled PEFT for multimodal sequential recommendation."""

__version__ = "0.1.0"
