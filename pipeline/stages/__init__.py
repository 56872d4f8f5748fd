"""Entry points: one thin module per DVC stage (`python -m pipeline.stages.<name>`), and predict.

Under a warm stage server (pipeline/runtime/warm.py) a stage command hands itself over here, before its module
imports anything heavy."""

from pipeline.runtime.warm import hand_over_if_served

hand_over_if_served()
