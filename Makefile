# Install order matters for the PyTorch side (conventions.md): torch 2.13.0 (CPU wheel)
# first, dynamic-network-architectures without its deps (never timm/torchvision),
# then MONAI, then this package with its test extras.
PY ?= python

.PHONY: install install-torch test demo

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
