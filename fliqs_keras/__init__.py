"""fliqs_keras: one-shot mixed-precision integer and floating-point quantization search for Keras 3.

`apply(model, search_space)` returns a searchable copy of a model: its
convolution, dense and attention layers wrapped so that each quantizes its
weights and inputs in the format currently chosen for it. The numerical base:
`formats` (what a format is), `quantizers` (exact fake quantization) and
`clipping` (per-format clip thresholds). `FliqsSearch` runs the search during
`fit`; `export` writes the fixed model, the policy file and a verified TFLite file;
`models` holds reference networks (ResNet-18/50, MobileNetV2, a small ViT,
small digits models); `data` the offline digits and the TFDS pipelines;
`plots` the figure of a search; `batch_norm` re-estimates the batch norms of
the finished model.
"""

from fliqs_keras import (batch_norm, clipping, controller, cost, export, files, format_state, formats, formats_file,
                         graph, layers, models, quantizers, search, search_config, search_step, wrapping)
from fliqs_keras.wrapping import apply, report, set_formats
from fliqs_keras.batch_norm import reestimate as reestimate_batch_norm
from fliqs_keras.search import FliqsSearch
from fliqs_keras.formats import FloatFormat, IntFormat
from fliqs_keras.layers import AttentionQuantizeWrapper, QuantizeConfig, QuantizeWrapper
from fliqs_keras.search_config import SearchConfig
from fliqs_keras.search_model import SearchModel, chosen_formats, decisions, searchable_layers
from fliqs_keras.search_space import SearchSpace

__version__ = "0.1.0"

__all__ = [
    "AttentionQuantizeWrapper", "FliqsSearch", "FloatFormat", "IntFormat", "QuantizeConfig", "QuantizeWrapper",
    "SearchConfig", "SearchModel", "SearchSpace", "__version__", "apply", "batch_norm", "clipping", "controller",
    "chosen_formats", "cost", "decisions", "export", "files", "format_state", "formats", "formats_file", "graph",
    "layers", "models", "quantizers", "reestimate_batch_norm", "report", "search", "search_config",
    "search_step", "searchable_layers", "set_formats", "wrapping",
]
