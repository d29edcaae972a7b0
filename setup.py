from setuptools import find_packages, setup

setup(
    name="dkdm",
    version="0.1.0",
    description="Data-free knowledge distillation for diffusion models with any architecture (DKDM)",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["dkdm", "dkdm.*", "evaluations"]),
    package_data={"dkdm": ["assets/*.pt", "assets/*.json", "assets/digits_autoencoder/*"]},
    install_requires=[
        "torch>=2.1",
        "numpy",
        "scipy",
        "blobfile",
        "tqdm",
        "pillow",
        "pyyaml",
        "scikit-learn",
        "safetensors",
    ],
    extras_require={
        "mpi": ["mpi4py", "mpich"],
        "eval": ["tensorflow-cpu", "requests"],
        "paper": ["matplotlib"],  # benchmarks/paper_tables.py figures
        "latent": ["diffusers"],  # diffusers teachers (dkdm/models/foreign.py), first-stage autoencoders
        "compress": ["torch-pruning>=1.6"],  # structural pruning (dkdm/models/prune.py, scripts/compress.py)
        # mutmut: make mutation (without it the target stopped at "mutmut: not found")
        "dev": ["pytest", "ruff", "matplotlib", "diffusers", "torch-pruning>=1.6", "mutmut>=3"],
    },
)
