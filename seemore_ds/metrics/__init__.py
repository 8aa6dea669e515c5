"""Where training metrics go: CSV files, the console progress bar, plots. Rank 0 only."""
