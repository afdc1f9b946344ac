"""The cloud side: Arrow Flight feature server, feature store, batched embedding, auth."""
