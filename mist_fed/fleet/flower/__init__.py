"""The fleet's Flower adapters: the only package of mist_fed that imports ``flwr``."""
