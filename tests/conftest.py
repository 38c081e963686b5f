"""Test set-up shared by every test module."""

import os

# Before TensorFlow is first imported: keep its start-up noise out of the output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
