# Install order matters for the PyTorch side (conventions.md): torch 2.13.0 (CPU wheel)
# first, dynamic-network-architectures without its deps (never timm/torchvision),
# then MONAI, then nnU-Net v2 without its deps, then this package with its test extras.
PY ?= python

.PHONY: install install-torch install-nnunet test demo gpu-wheels

install:
	$(PY) -m pip install -e .

install-torch:
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install --no-deps dynamic-network-architectures==0.4.4 einops
	$(PY) -m pip install monai==1.6.1

# nnU-Net v2 (tests/test_nnunet_interop.py runs its real predictor): nnunetv2 without its
# dependencies, which would pull torch 2.14 + CUDA + torchvision (~6 GB), plus exactly what
# its predictor, its trainer class and load_pretrained_weights import.
NNUNET_DEPS = acvl-utils==0.2.6 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 \
  threadpoolctl==3.8.0 SimpleITK==2.5.7 blosc2==4.15.0 ndindex==1.10.1 httpx==0.29.0 \
  pandas==3.1.1 scikit-image==0.26.0 lazy-loader==0.6 tifffile==2026.3.3 \
  connected-components-3d==4.1.1 seaborn==0.13.2 scikit-learn==1.9.1 joblib==1.6.0 \
  narwhals==2.29.0

install-nnunet: install-torch
	$(PY) -m pip install --no-deps nnunetv2==2.8.1 $(NNUNET_DEPS)

test: install-nnunet
	$(PY) -m pip install -e ".[test,torch]"
	$(PY) -m pytest -q -n 2 --dist loadfile

demo: install
	petct demo --workdir runs/demo

# What a lent GPU machine lacks for benchmarks/gpu_checks.sh (its image has jax, flax and
# torch), as Python 3.12 manylinux wheels in .whl/ to carry there.
gpu-wheels:
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 nibabel==5.4.2 ml_collections==1.1.0 \
	  tensorboardX==2.6.5 monai==1.6.1 dynamic-network-architectures==0.4.4
