"""Experiments: several SAEs trained from one activation stream, timed, evaluated and reported."""
