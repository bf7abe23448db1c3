"""The engine: scheduling due batches, fanning them out, sending, reconciling."""
