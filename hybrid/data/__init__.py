"""Datasets: the LeRobot v3 format, training windows, the scene estimator's frames from other
rollouts, normalisation and the DataModule."""
