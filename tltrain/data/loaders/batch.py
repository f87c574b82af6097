"""The one batch structure every loader yields and the engine consumes (defined in tltrain.contracts, the ground
floor both the loaders and the engine import)."""
from tltrain.contracts import Batch

__all__ = ["Batch"]
