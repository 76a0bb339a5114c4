"""Scaling tool: measured head sweeps over ids, sample rates and world sizes, and the memory
model that predicts them (``python -m pfc_ds.scale``)."""
