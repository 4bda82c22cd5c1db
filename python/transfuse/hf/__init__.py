"""transformers integration: which HF module classes transfuse replaces, and with what.

norm.py holds the per-family norm rules (a table keyed by class name); transfuse.patch applies them.
"""
