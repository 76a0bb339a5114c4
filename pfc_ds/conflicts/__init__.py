"""Finding class centres that look like one identity under two labels (for cleaning data)."""

from pfc_ds.conflicts.finder import find, find_conflicts, open_bank, precision_recall, read_pairs

__all__ = ["find", "find_conflicts", "open_bank", "precision_recall", "read_pairs"]
