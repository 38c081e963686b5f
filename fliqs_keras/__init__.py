"""fliqs_keras: one-shot mixed-precision integer and floating-point quantization search for Keras 3.

The number formats (`formats`), the exact fake quantizers (`quantizers`) and
the per-format clip calibration (`clipping`) are the numerical base of the
search.
"""

from fliqs_keras import clipping, formats, quantizers
from fliqs_keras.formats import FloatFormat, IntFormat

__version__ = "0.1.0"

__all__ = ["FloatFormat", "IntFormat", "clipping", "formats", "quantizers", "__version__"]
