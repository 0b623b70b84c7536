"""Fuzzing campaigns for everything singlora reads from files (a test harness, not part of the package):
``python -m fuzzing --help``; ``fuzzing/harness.py`` explains the targets and engines."""
