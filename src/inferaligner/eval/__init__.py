"""Evaluation: judges that label completions, tasks, baselines and reports."""
