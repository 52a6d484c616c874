"""Integrations of cutlass_moe with model libraries, each opted into by importing it.

- :mod:`cutlass_moe.integrations.transformers`: ``experts_implementation="cutlass_moe"`` for
  Hugging Face transformers 5.x MoE models (importing it registers the name).

Importing ``cutlass_moe`` or this package imports none of those libraries.
"""
