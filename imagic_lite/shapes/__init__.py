"""The shapes model: a tiny text-to-image pipeline trained from scratch on a procedural world of coloured shapes.

Ships inside the package (`MODEL_DIR`), so the quickstart and the semantic tests run offline.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
