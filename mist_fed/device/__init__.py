"""Edge side: device profiles and their enforcement, the LAE trainer, checkpoints, the client."""
