"""specache: an LLM inference engine that never does the same work twice."""

from specache.api import LLM
from specache.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"
