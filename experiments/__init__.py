"""Hydra entry point for simulations and sweeps, and the benchmarks behind the README's numbers."""
