"""Entry points: one thin module per DVC stage (`python -m pipeline.stages.<name>`), and predict."""
