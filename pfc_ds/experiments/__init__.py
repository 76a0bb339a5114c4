"""Experiments that run the normal trainer many times and summarise the results."""
