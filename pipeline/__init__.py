"""The pipeline: one entry module per DVC stage in `stages/`, library code in subpackages by concern."""
