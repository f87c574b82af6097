"""tltrain: distributed transfer learning for fundus images (DR grading)."""

__version__ = "0.1.0"
