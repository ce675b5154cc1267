"""The bottom layer: what every other layer imports and which imports none of them. The config tree (one module
per section), the error a user sees for a bad setting, the end-of-run summary table and metric files, and the
atomic file writer."""
