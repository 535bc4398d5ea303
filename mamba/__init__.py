"""Mamba-family language models: model code (mamba.model) and Composer recipe entry points."""
