"""The replay stage: another U-Net run on a recorded denoising trajectory, its activations captured.

The same-image controls (random features, same inputs, same labels): the trained model's recorded
per-step inputs (``capture.record_inputs``) fed to a permuted or freshly initialised U-Net, captured
into a store that shares the model's images and labels. The input is any per-step (latent input,
timestep, text embedding) trajectory source, not only a generation store's.
"""
