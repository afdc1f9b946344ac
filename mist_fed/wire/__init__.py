"""Arrow transport of features: schema, codec, Flight client, bandwidth shaping, byte accounting."""
