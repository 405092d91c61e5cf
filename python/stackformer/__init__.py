"""stackformer: stacked self-attention transformers with a C core and a thin NumPy API.

Plain residual stacks, Attention Residuals and Mixture-of-Depths Attention, with traces that
show what every layer reads. See README.md for a tour and DEVELOPERS.md for the math.
"""
from ._core import get_num_threads, set_num_threads
from .config import Config
from .model import Model, Output, ParamTree, Trace, TraceOptions
from . import data
from .data import Corpus, default_corpus
from .train import History, lr_schedule, train

__version__ = "0.1.0"

__all__ = ["Config", "Model", "Output", "ParamTree", "Trace", "TraceOptions",
           "set_num_threads", "get_num_threads", "__version__",
           "data", "Corpus", "default_corpus", "History", "lr_schedule", "train"]
