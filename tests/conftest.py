"""Shared test setup: quiet TF logs, 2 logical CPU devices for distribution tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
