"""What uses the pipeline: the classifier on decoded images, the intervention, the semantic lens and the
toy model's sample quality. Each imports the pipeline and never another experiment."""
