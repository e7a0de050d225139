"""whisper-ft: fine-tune OpenAI's Whisper for one language or domain (README.md, docs/DESIGN.md)."""

__version__ = "0.2.0"
