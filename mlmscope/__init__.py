"""mlmscope: a workbench for studying how small masked language models learn.

The import package ``mlmscope`` maps the repository's four top-level folders (see ``setup.py``):

* :mod:`mlmscope.checkpoints`: corpus, tokenizer, the training loop and its checkpoint trajectory (the lowest layer);
* :mod:`mlmscope.probes`: probe sets with dependency parses and the one-pass activation capture;
* :mod:`mlmscope.analyses`: the analyses, their runner and the Parquet results store;
* :mod:`mlmscope.app`: the ``mlmscope`` command line, the report and the Streamlit dashboard.

Each layer imports only the layers listed before it. Every error meant for a user is a :class:`MlmscopeError`.
"""

from importlib.metadata import PackageNotFoundError, version

from .checkpoints.errors import MlmscopeError  # pyright: ignore[reportMissingImports]

try:
    __version__ = version("mlmscope")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["MlmscopeError", "__version__"]
