"""Keras 3 models: image/text encoders, PLACE layers and the PLACEModel."""
