"""Routing pieces of DES-MoE: the adaptive router (alr.py) and expert-domain affinity (affinity.py)."""
