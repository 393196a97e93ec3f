"""jeat: adversarially robust and generative classifiers through their energies.

``jeat.evaluate(model, (x, y), eps=8/255)`` is the robustness table of any classifier
(:func:`jeat.evaluate.evaluate_model`); :func:`jeat.load_model` loads a model from any source
(:mod:`jeat.sources`).
"""

from jeat import evaluate
from jeat.errors import JeatError
from jeat.sources import load_model
from jeat.version import __version__

__all__ = ["JeatError", "__version__", "evaluate", "load_model"]
