"""A procedural toy world where a small Stable-Diffusion-format base model can be pretrained offline, so that
CLIF's claim (fewer mixed-up concepts) can be measured without downloading real weights."""
