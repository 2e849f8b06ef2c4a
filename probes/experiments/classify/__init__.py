"""The classifier experiment: an off-the-shelf classifier on each step's decoded image.

``models`` loads classifiers by name (torchvision, timm, the toy world's), ``metrics`` scores their
probabilities per step (top-1, top-5, probability of the prompt's class), ``run`` applies both to
decoded images ``[N, S, H, W, 3]``, ``imagenet`` and ``prompt_sets`` build class-labelled prompt
sets (CSV column ``class_index``), ``stage`` runs it inside a probe run (a callback), and
``diffusion-probes classify`` scores a saved ``.npy``.
"""
