"""turbo-harness: verification harness for llama.cpp forks with TurboQuant KV-cache types."""

__version__ = "0.1.0"
