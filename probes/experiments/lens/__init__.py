"""Semantic lens (Bonechi et al. 2025): how well U-Net features of real images keep object semantics.

The pieces here do not touch the U-Net, so they can be tested on their own: real-image datasets
with instance masks (:mod:`.datasets`), joint image+mask transformations (:mod:`.transforms`),
per-instance pooling of feature maps (:mod:`.pooling`), distance measures (:mod:`.distances`) and
the scores that compare layers, distances and transformations (:mod:`.scores`).

The U-Net side: features of real images from any registered layer (:mod:`.features`), one vector
per object and layer cached on disk (:mod:`.embeddings`), the experiments as functions of those
vectors (:mod:`.experiments`), a run over a model and its permuted-weights control
(:mod:`.runner`), and its report (:mod:`.report`). The toy world is a dataset too
(:mod:`.datasets.toy`). Command: ``diffusion-probes lens --config configs/lens/toy.yaml``.
"""
