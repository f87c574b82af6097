"""Transfer learning on timm models: layer groups, phase schedules, frozen features + scikit-learn classifiers."""
from tltrain.transfer.features import extract_features, fit_classifier, predict_proba
from tltrain.transfer.groups import LayerGroup, layer_groups
from tltrain.transfer.schedule import PRESETS, Phase, Schedule, ScheduleConfig, build_schedule

__all__ = ["LayerGroup", "PRESETS", "Phase", "Schedule", "ScheduleConfig", "build_schedule", "extract_features",
           "fit_classifier", "layer_groups", "predict_proba"]
