"""torchrec-dimgrow. Install with scripts/install.sh (it pins torch/fbgemm/torchrec)."""

from setuptools import find_packages, setup

setup(
    name="torchrec-dimgrow",
    version="0.1.0",
    description="DimGrow embedding-dimension search as a TorchRec plugin (sharded, torchrun)",
    packages=find_packages(include=["torchrec_dimgrow", "torchrec_dimgrow.*"]),
    python_requires=">=3.10",
    # torchrec is deliberately not listed: its metadata requires the CUDA fbgemm-gpu wheel.
    # scripts/install.sh installs it with --no-deps next to the right fbgemm build.
    install_requires=[
        "torch==2.13.0",
        "tensordict==0.12.2",
        "torchmetrics==1.0.3",
        "tqdm==4.67.1",
        "pyre-extensions==0.0.32",
        "pyarrow==21.0.0",
        "numpy==2.3.4",
    ],
    extras_require={"plot": ["matplotlib==3.10.7"], "tensorboard": ["tensorboard"]},
    entry_points={"console_scripts": ["torchrec-dimgrow=torchrec_dimgrow.cli:main"]},
)
