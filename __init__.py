"""kzprobe: measure website blocking from inside a country, and show how it is done.

The public API is small on purpose (the model and the classifier); everything else lives in
sub-packages that the CLI imports lazily so that ``kzprobe --help`` stays fast.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
