# Install order matters for the PyTorch side (conventions.md): torch 2.13.0 (CPU wheel)
# first, dynamic-network-architectures without its deps (never timm/torchvision),
# then MONAI, then this package with its test extras.
PY ?= python

.PHONY: install install-torch test demo gpu-wheels

install:
	$(PY) -m pip install -e .

install-torch:
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install --no-deps dynamic-network-architectures==0.4.4 einops
	$(PY) -m pip install monai==1.6.1

test: install-torch
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
