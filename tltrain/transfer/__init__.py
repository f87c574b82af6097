"""Transfer learning on timm models: layer groups (groups), phase schedules (schedule, with its torch-free config
in schedule_config), frozen features + scikit-learn classifiers (features). Import the submodule you need: the
config must stay importable without torch and timm."""
