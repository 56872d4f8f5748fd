"""The final model on disk: saving, loading, exports, and reading files to predict on."""
