"""Every family of text-to-image model the probes read: SD 1.x/2.x, SDXL, SD3, PixArt-α/Σ, FLUX.

A family says which pipeline runs it, where its denoiser is, how classifier-free guidance lays out
the batch and how steps are reported (:mod:`.spec`); a layer is a module path plus a readout rule
(:mod:`probes.diffusion.readout`) on a token grid (:mod:`.layers`); :mod:`.loading` loads any
family through ``from_pretrained``, :mod:`.tiny` builds tiny random pipelines of each offline,
:mod:`.forward` runs one denoiser pass on a given latent (the semantic lens), and :mod:`.sizes`
sizes the store of the real models from their configs. Capture and the pipeline call are the
generation stage's (:mod:`probes.generation.capture`, :mod:`probes.generation.call`).
"""
