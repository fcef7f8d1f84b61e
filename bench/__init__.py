"""Measurement: the loader / step / e2e benchmarks (`python -m bench`, see bench/__main__.py), the Python call
counter behind their per-batch counts, and the GPU-window tools (gpu_run.sh and the modules it runs).

The top layer: it may import every other layer, and nothing outside tests imports it.
"""
