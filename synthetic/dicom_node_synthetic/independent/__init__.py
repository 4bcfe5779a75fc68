"""Independently designed phantom families, used only for held-out evaluation.

Each module here is written separately from the training generator of the
same task (other shapes, another intensity model, another noise model) and
imports nothing from it, so that a model's figures on these phantoms say
whether it learned the task rather than its generator.  No recipe trains on
them.
"""
