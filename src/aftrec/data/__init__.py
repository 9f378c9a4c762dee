"""Multi-domain interaction data: sources, validation, splits, histories and batches."""
