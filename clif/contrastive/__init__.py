"""Stage 1 only (train_clif.py): image-caption pairs (Global / Region / Mix augmentations, masks,
regions, captions, common concepts), the paired CLIP, the text side, the contrastive loss, gradient caching and
the confusion probe with its figures."""
