"""GPU benchmarks of diffdyn against the PyTorch peers: `python bench/run.py --help`."""
