"""Pure scores: exact per-image metrics of probe heads (from token-level predictions), of whole maps and
masks, and the rows of the baselines (labeler on decoded images, position only). No stage is imported."""
