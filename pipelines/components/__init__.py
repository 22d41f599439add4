"""Custom TFX components of the PLACE pipeline (Python-function components)."""
