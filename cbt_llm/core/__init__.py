"""The bottom layer: what every other layer imports and which imports none of them. The typed config tree, one
module per section (config/), the one error a user sees for a bad setting (errors), the end-of-run summary table
and metric files (report), and the atomic file writer with the local-folder-or-Hub-id rule (fileio)."""
