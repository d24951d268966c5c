"""Datasets: the LeRobot v3 format, training windows, normalisation and the DataModule."""
