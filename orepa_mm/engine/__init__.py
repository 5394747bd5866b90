"""mmengine runtime parts: hooks."""
from .hooks import BranchSimilarityHook

__all__ = ['BranchSimilarityHook']
