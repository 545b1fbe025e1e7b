"""Several hub replicas on one store: who is alive and where (registry.py)."""
