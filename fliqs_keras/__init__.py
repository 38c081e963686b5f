"""fliqs_keras: one-shot mixed-precision integer and floating-point format search (FLIQS) for Keras 3.

`apply` makes a searchable copy of a model, `FliqsSearch` searches its formats
(and, for a model of `blocks`, its architecture) during `fit`, and `export`
writes the result to a verified TFLite file. Where
each part lives: docs/design.md.
"""

import os

# Before TensorFlow first loads (Keras imports it); a value the user set wins. Its C++ INFO and WARNING lines stay
# out of a user's output (errors still show), and oneDNN's custom CPU ops, which change float round-off (and print
# a notice saying so), stay off: the exactness of the quantizers is tested without them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from fliqs_keras import (architecture, batch_norm, blocks, clipping, controller, cost, cost_tables, export, files,
                         format_state, formats, formats_file, graph, layers, measure, models, quantizers, runtime,
                         search, search_config, search_step, wrapping)
from fliqs_keras.batch_norm import reestimate as reestimate_batch_norm
from fliqs_keras.search import FliqsSearch
from fliqs_keras.formats import FloatFormat, IntFormat
from fliqs_keras.layers import AttentionQuantizeWrapper, QuantizeConfig, QuantizeWrapper
from fliqs_keras.measure import measure_latency, measure_size
from fliqs_keras.search_config import SearchConfig
from fliqs_keras.search_model import SearchModel, chosen_formats, decisions, searchable_layers
from fliqs_keras.search_space import SearchSpace
from fliqs_keras.wrapping import apply, report, set_formats

__version__ = "0.1.0"

__all__ = [
    "AttentionQuantizeWrapper", "FliqsSearch", "FloatFormat", "IntFormat", "QuantizeConfig", "QuantizeWrapper",
    "SearchConfig", "SearchModel", "SearchSpace", "__version__", "apply", "architecture", "batch_norm", "blocks",
    "clipping", "controller",
    "chosen_formats", "cost", "cost_tables", "decisions", "export", "files", "format_state", "formats", "formats_file",
    "graph", "layers", "measure", "measure_latency", "measure_size", "models", "quantizers", "reestimate_batch_norm",
    "report", "runtime", "search", "search_config", "search_step", "searchable_layers", "set_formats", "wrapping",
]
