"""poe_core: the Pool of Experts ML library (data, nets, losses, training, pool bundle,
assembly, evaluation). It knows nothing of HTTP or SQL."""
