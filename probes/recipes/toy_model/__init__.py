"""The toy diffusion model's recipe: VAE (``autoencoder``), text encoder and U-Net (``denoiser``), the
resumable loop (``checkpoint``), and the whole run (``recipe``)."""
