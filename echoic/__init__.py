"""echoic: end-to-end speech recognition on PyTorch."""

__version__ = "0.1.0"
