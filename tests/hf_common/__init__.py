"""Transformers' own common model tests on plain BERT and on the PAD classes (see conftest.py)."""
