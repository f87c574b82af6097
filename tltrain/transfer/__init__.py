"""Transfer learning on timm models: layer groups, phase schedules, frozen features + scikit-learn classifiers.

The names below are imported on first use, so importing the torch-free config (transfer.schedule_config) does
not pull in torch and timm."""
from importlib import import_module

_HOMES = {"extract_features": "features", "fit_classifier": "features", "predict_proba": "features",
          "LayerGroup": "groups", "layer_groups": "groups", "PRESETS": "schedule", "Phase": "schedule",
          "Schedule": "schedule", "ScheduleConfig": "schedule", "build_schedule": "schedule"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f"tltrain.transfer.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
