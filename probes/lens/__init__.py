"""Semantic lens (Bonechi et al. 2025): how well U-Net features of real images keep object semantics.

The pieces here do not touch the U-Net, so they can be tested on their own: real-image datasets
with instance masks (:mod:`.datasets`), joint image+mask transformations (:mod:`.transforms`),
per-instance pooling of feature maps (:mod:`.pooling`), distance measures (:mod:`.distances`) and
the scores that compare layers, distances and transformations (:mod:`.scores`).
"""
