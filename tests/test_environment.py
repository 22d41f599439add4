"""The main job's environment: the locked stack imports and Keras is 3.x on TensorFlow.
The TFX runtime is checked in test_environment_tfx.py (it needs glibc >= 2.39)."""


def test_stack_versions():
    import keras
    import keras_hub
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (registers the WordPiece ops)

    assert tf.__version__.startswith("2.21."), tf.__version__
    assert keras.__version__.startswith("3."), keras.__version__
    assert keras.backend.backend() == "tensorflow"
    assert keras_hub.__version__ == "0.32.0"
