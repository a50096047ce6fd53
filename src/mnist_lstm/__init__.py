"""The tutorial's row-by-row MNIST LSTM as a DVC pipeline tracked in MLflow."""

import os

# TensorFlow's C++ log buries the pipeline's own output: on a machine without a GPU every process
# prints "E0000 ... failed call to cuInit: ... UNKNOWN ERROR (303)", an ERROR that level 2 still
# shows, besides oneDNN and CPU-feature notices. Level 3 keeps the C++ log's FATAL lines only;
# Python's errors, warnings and tracebacks are untouched. Your own TF_CPP_MIN_LOG_LEVEL wins
# (TF_CPP_MIN_LOG_LEVEL=0 shows the whole C++ log again).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
