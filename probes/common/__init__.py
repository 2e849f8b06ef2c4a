"""Small shared tools every stage may use: hashing, the registry shape, the CSV writer, the progress bar,
downloads, environment flags, thread settings, the code version."""
