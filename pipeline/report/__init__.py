"""The pipeline report: reading stage outputs, claims with statistics, plots."""
