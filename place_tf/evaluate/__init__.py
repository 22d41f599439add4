"""Downstream evaluation tasks and metrics (`python -m place_tf.evaluate`)."""
