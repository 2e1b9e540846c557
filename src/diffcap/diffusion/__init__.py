"""Noise schedules, the Gaussian diffusion process with its training losses, and samplers."""
