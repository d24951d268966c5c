"""Simulator adapters: environments, scripted experts and their language annotations."""
