"""The tutorial's row-by-row MNIST LSTM as a DVC pipeline tracked in MLflow."""

import os

# TensorFlow's C++ start-up chatter (oneDNN, CPU features) buries the pipeline's own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
