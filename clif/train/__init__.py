"""Training mechanics shared by the diffusion stages: stage set-up, the training skeleton, the step loop,
the noise and loss, the image data stream, prior preservation and LoRA adapters."""
