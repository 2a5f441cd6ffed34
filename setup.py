"""mfmegatron: MeanFlow distillation of large text-to-image diffusion models on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="mfmegatron",
    version="0.1.0",
    description=(
        "Megatron-style model-parallel MeanFlow distillation of FLUX.1 and HunyuanImage 3.0 "
        "into 1-4 step generators"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["mfmegatron", "mfmegatron.*", "models", "models.*", "tools", "tools.*"]),
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.19,<0.20",
        "numpy",
        # megatron-core's dist_checkpointing and its CPU worker processes need psutil.
        "psutil",
        "webdataset",
        "sentencepiece",
        "safetensors",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "pillow",
        # T5/CLIP text encoders for prompts whose shards carry no precomputed embeddings.
        "transformers",
        # HunyuanImage 3.0's tokenizer.json (models/hunyuan_image3/tokenizer.py).
        "tokenizers",
    ],
    extras_require={
        # DALI for CUDA 13 (CUDA 12 machines: nvidia-dali-cuda120).
        "gpu": ["transformer-engine[pytorch]", "nvidia-dali-cuda130"],
        "test": ["pytest", "diffusers", "transformers", "matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "mfmegatron-selfcheck=mfmegatron.selfcheck:main",
            "mfmegatron-convert-flux=tools.convert_flux:main",
            "mfmegatron-convert-hunyuan-image3=tools.convert_hunyuan_image3:main",
            "mfmegatron-train=mfmegatron.train:main",
            "mfmegatron-build-prompt-shards=tools.build_prompt_shards:main",
            "mfmegatron-build-image-shards=tools.build_image_shards:main",
        ],
    },
)
