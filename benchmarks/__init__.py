"""Benchmarks of clipsearch against the seed tutorial's loop and the machine's peak."""
