"""Small shared utilities: hashing, environment flags, thread settings, the code version."""
