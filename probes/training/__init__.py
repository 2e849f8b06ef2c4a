"""Stage 5: probes: tasks, probe banks, the Lightning modules and the data module that feeds them."""
