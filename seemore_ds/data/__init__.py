"""Data: the CSV reader, image decoding, the built-in synthetic dataset, split, sampler and batches."""
