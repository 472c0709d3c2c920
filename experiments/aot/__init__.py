"""Compile the train step for an accelerator that is not here: see
__main__.py and docs/accelerators.md."""
