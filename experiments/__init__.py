"""Paper experiments: the registry of rows (tables.py), the command planner and
runner (run.py), the results summariser (summarize.py) and launch recipes
(launch/). See experiments/README.md."""
