"""turbo-harness: verification harness for llama.cpp forks with TurboQuant KV-cache types."""
import os

__version__ = "0.1.0"

# NumPy's OpenBLAS starts one thread per core for every matrix product. The harness's products are small (128 x 128
# rotations, attention of a few hundred rows) and the probe worker, the fork's tools and other jobs share the cores:
# the threads then spin against each other, and 150 products of (256, 128) x (128, 128) took 1.5 s at load 5 on 2
# cores against 0.05 s on one thread (scripts/bench_verify.py: verify 29.1 s -> 18.3 s at load 5.5-8.4). Set before
# numpy is first imported (this package's modules import it); OPENBLAS_NUM_THREADS set by the user is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
