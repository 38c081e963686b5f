"""Keeps the converter's and the interpreter's own output out of a user's run.

TensorFlow's SavedModel and converter logs, LiteRT's delegate notices and the
quantizer's progress bars are written by C++ and third-party Python straight to
the process's stdout and stderr; `quiet` sends them to a temporary file instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from typing import Iterator

from absl import logging


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silences what the enclosed calls write to stdout and stderr, and their warnings.

    Nothing is silenced when absl's verbosity is DEBUG or finer (``-v 1``,
    ``--verbosity=1``, or `absl.logging.set_verbosity(absl.logging.DEBUG)`).
    When the enclosed code raises, the end of what it wrote is logged as an
    error before the exception propagates, so nothing that explains a failure
    is lost.
    """
    if logging.get_verbosity() >= logging.DEBUG:
        yield
        return
    _flush()
    with tempfile.TemporaryFile() as sink:
        saved = [os.dup(1), os.dup(2)]
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        failed = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        except BaseException:
            failed = True
            raise
        finally:
            _flush()
            for target, descriptor in enumerate(saved, 1):
                os.dup2(descriptor, target)
                os.close(descriptor)
            if failed:
                sink.seek(0)
                written = sink.read().decode("utf-8", "replace").strip()
                if written:
                    logging.error("Output of the failed call (last 4,000 characters):\n%s", written[-4000:])


def _flush():
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
