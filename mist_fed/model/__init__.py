"""The method in pure torch, no I/O beyond loading weights: backbone, gather, edge networks, cost."""
