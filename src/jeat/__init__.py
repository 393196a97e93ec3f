"""jeat: adversarially robust and generative classifiers through their energies."""

from jeat.errors import JeatError

__version__ = "0.1.0"
__all__ = ["JeatError", "__version__"]
