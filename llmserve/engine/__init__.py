"""The model engine: a native thread that batches every running sequence into each decode step."""
