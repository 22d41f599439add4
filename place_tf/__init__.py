"""PLACE-TF: pathological-level cross-modal alignment and patch correlation exploration
for chest X-ray image-report pre-training, on TensorFlow 2.21 / Keras 3 / TFX 1.21.

The library has no side effects at import: no flags are parsed, nothing is downloaded.
"""

__version__ = "0.1.0"
