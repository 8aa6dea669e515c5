"""Where training metrics go: ``processor`` (the loop's metrics component), the CSV logs, W&B, plots,
captions.png and the end-of-run summary. Handed figures only: nothing here knows a model or an engine."""
