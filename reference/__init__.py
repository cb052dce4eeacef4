"""Thin adapters to trusted libraries: the oracles we agree with and the peers we race."""
