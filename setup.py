"""Package metadata. kernels/ is installed as tltrain.kernels (charter: kernels live at the top level)."""
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "tltrain" / "__init__.py").read_text(), version)


def _packages(root: str, prefix: str) -> list[str]:
    """Every folder with an __init__.py under root, as dotted names under prefix."""
    base = ROOT / root
    found = []
    for init in sorted(base.rglob("__init__.py")):
        rel = init.parent.relative_to(base).parts
        found.append(".".join((prefix, *rel)) if rel else prefix)
    return found


setup(
    name="tltrain",
    version=version["__version__"],
    description="Distributed transfer-learning toolkit for fundus images (DR grading): "
    "WebDataset shards, DALI/Triton preprocessing, DDP/DeepSpeed, SLURM via submitit",
    python_requires=">=3.10",
    packages=_packages("tltrain", "tltrain")
    + _packages("kernels", "tltrain.kernels")
    + _packages("configs", "tltrain.configs"),
    package_dir={"tltrain": "tltrain", "tltrain.kernels": "kernels", "tltrain.configs": "configs"},
    package_data={"tltrain.configs": ["*.yaml", "**/*.yaml"]},
    install_requires=[
        "torch>=2.4,<2.15",
        "torchvision",
        "triton",
        "deepspeed",
        "webdataset",
        "hydra-core>=1.3",
        "pyyaml",  # tltrain.safe_io composes YAML itself (node caps before anything is built)
        "hydra-submitit-launcher",
        "submitit",
        "tensorboard",
        "timm",
        "scikit-learn",
        "safetensors",
        "numpy",
        "pillow",
        "tqdm",
        "rich",
        "matplotlib",
        "pandas",
        "scipy",
        "grad-cam>=1.5,<1.6",  # tltrain explain: LayerCAM's per-layer maps (pytorch_grad_cam; fusion is ours)
        "opencv-python-headless",  # the CPU Gaussian blur of the preprocessing (tltrain.preprocess.gaussian_blur)
        "numba",  # the fused CPU kernels of the preprocessing (tltrain/preprocess_cpu.py)
    ],
    extras_require={
        # DALI is published per CUDA major version; the default build is CUDA 13 (its CPU ops run anywhere).
        "dali": ["nvidia-dali-cuda130"],
        "cuda12": ["nvidia-dali-cuda120"],
        "test": ["pytest", "pytest-timeout", "ruff"],  # ruff: `make lint` (pyproject.toml [tool.ruff])
        # benchmarks/bench_loaders.py's hand-written OpenCV Ben Graham baseline
        "bench": ["opencv-python-headless"],
    },
    entry_points={"console_scripts": ["tltrain=tltrain.cli:main"]},
)
