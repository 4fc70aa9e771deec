"""The KV-cache service: the authoritative paged latent store, its block manager and prefix index."""
