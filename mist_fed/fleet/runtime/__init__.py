"""Where a fleet run lives: Ray, assets and cloud, the run session and its one stop path."""
