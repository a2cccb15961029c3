"""Where activations come from: files, on-disk caches, live harvest from a language model."""
