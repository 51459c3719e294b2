"""A template dpatia analysis (see analysis.py); copy the package to start your own."""
