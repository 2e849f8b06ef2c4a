"""The intervention (causal test): edit activations so that the probes read a moved object, then
check whether the generated image follows. ``editor`` swaps the hooked outputs, ``targets`` builds
counterfactuals, ``score`` measures the result, ``video`` films a moving object, ``run`` is the
``diffusion-probes intervene`` command."""
