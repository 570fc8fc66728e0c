"""The pipeline's stages: each a plain function, a cache key over its inputs, and a click command."""
