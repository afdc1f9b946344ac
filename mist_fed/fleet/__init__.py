"""Fleets of edge devices. The domain (this package's modules: spec, plan, rounds, scoring, job)
imports neither flwr nor ray; ``runtime/`` runs it (Ray, the run session, the one stop path) and
``flower/`` adapts it to Flower (strategies, Grid transport, ServerApp / ClientApp)."""
