"""Federation of edge devices: fleet specs, the device round, Flower ClientApp / ServerApp, runs."""
