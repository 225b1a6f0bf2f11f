"""What a stage writes and how: atomic files, the manifest and embeddings (artifacts), resumable checkpoints,
and the guarded output folder."""
