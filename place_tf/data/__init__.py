"""Data: the TFRecord schema, SynthCXR, converters for public datasets, tokenizer, tf.data."""
