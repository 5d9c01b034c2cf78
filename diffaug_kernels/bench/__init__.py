"""Benchmarks and the tools around them: the timing harness and the ops benchmark (harness.py), the UNet,
DiffAug-step and ensemble benchmarks (model.py), charts (plots.py), and the CUDA kernels' SASS (sass.py)."""
