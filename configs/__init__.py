"""Hydra config tree (installed as tltrain.configs so an installed tltrain finds its configs)."""
