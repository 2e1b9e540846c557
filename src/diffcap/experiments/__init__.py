"""Comparing settings under equal conditions: training to a time budget, timing captioning, sweeps of
config variants (``diffcap sweep``) and the Flickr8k proxy benchmark (benchmarks/flickr8k_proxy.py)."""
