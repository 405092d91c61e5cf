"""stackformer: stacked self-attention transformers with a C core and a thin NumPy API.

Plain residual stacks, Attention Residuals and Mixture-of-Depths Attention, with traces that
show what every layer reads. See README.md for a tour and DEVELOPERS.md for the math.
"""
import os as _os

# OpenMP threads that busy-wait between parallel regions steal the CPU from the very threads
# they wait for whenever the machine is shared (a notebook beside a browser, a CI runner): a
# train step measured 8x slower. So waits sleep, after a very short spin: waking a sleeping
# thread took ~40 us on a 2-core VM, and a train step runs ~700 parallel regions back to back.
# Measured there (S train step, 2 threads): 1000 spins (~10 us; libgomp's own default is
# 300000) are 7% faster than sleeping at once on an idle machine and 5% slower beside a busy
# process; 10000 spins were as fast idle but 40% slower beside one.
# Set OMP_WAIT_POLICY=ACTIVE before importing stackformer to opt back in on a dedicated machine.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    _os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from ._core import get_num_threads, matmul_kernel, bf16_kernel, threads_capped  # noqa: E402
from . import _core as _c
from ._checks import check_int as _check_int
from .blas import blas_info, use_blas, use_builtin_matmul
from .config import Config, BF16EmulatedWarning
from .model import Model, Output, ParamTree, Trace, TraceOptions
from . import data
from .data import Corpus, DataWarning, default_corpus
from .train import History, lr_schedule, train
from . import study

__version__ = "0.1.0"


def set_num_threads(n: int) -> None:
    """Threads every compute call uses from now on (0 = all cores; default). Results are
    bitwise identical for any count."""
    _c.set_num_threads(_check_int("n", n, 0, 1024))


__all__ = ["Config", "Model", "Output", "ParamTree", "Trace", "TraceOptions",
           "set_num_threads", "get_num_threads", "threads_capped", "matmul_kernel", "bf16_kernel", "BF16EmulatedWarning", "use_blas", "use_builtin_matmul", "blas_info",
           "__version__",
           "data", "Corpus", "DataWarning", "default_corpus", "History", "lr_schedule", "train", "study"]
