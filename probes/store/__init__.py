"""The activation store: manifest, memory-mapped arrays, per-sample commits; the stage that fills it
(``fill``) and the disk a run will write (``disk``)."""
