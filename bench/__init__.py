"""Measurement: the loader / step / e2e benchmarks (`python -m bench`, see bench/__main__.py) and the Python call
counter behind their per-batch counts.

The top layer: it may import every other layer, and nothing outside tests imports it.
"""
