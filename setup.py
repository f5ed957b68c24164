from setuptools import find_packages, setup

setup(
    name="muscle-hpc",
    version="0.1.0",
    description="MUSCLE pre-training of X-ray backbones (MD-MoCo, continual multi-task, "
                "fine-tuning) on Slurm GPU clusters with DeepSpeed and FFCV",
    packages=find_packages(include=["muscle_hpc*", "data_prep*", "bench*"]),
    python_requires=">=3.10",
    install_requires=["torch", "torchvision", "deepspeed", "numpy", "numba", "pycocotools",
                      "submitit", "tensorboard", "tqdm", "pyyaml", "scikit-learn", "pillow",
                      "opencv-python-headless", "safetensors"],
    extras_require={"ffcv": ["ffcv==1.0.2"]},
)
