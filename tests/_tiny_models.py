"""A tiny random BERT with a WordPiece tokenizer, saved like a real dense checkpoint (no downloads)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def save_tiny_bert(path: Path, words: Sequence[str], punctuation: Sequence[str] = (".", '"')) -> list[str]:
    """Save a 2-layer, hidden-32 BERT and its tokenizer (vocab: special tokens, punctuation, "##s", words)
    to `path`; returns the vocabulary."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = [*SPECIAL_TOKENS, *punctuation, "##s", *words]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(path / "vocab.txt"))  # transformers 5: `vocab=`, not `vocab_file=`
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return vocab
