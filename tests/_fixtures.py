"""Test fixtures written like real inputs (no downloads): a tiny random BERT checkpoint, GLUE-format TSVs."""

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


def fixture_sentence(words: Sequence[str], i: int, n: int = 5) -> str:
    """A deterministic sentence of `n` words; every 4th has a quoted word, as GLUE sentences do."""
    chosen = [words[(i * 7 + j * 3) % len(words)] for j in range(n)]
    if i % 4 == 0:
        chosen[1] = f'"{chosen[1]}"'  # the TSV reader must keep quotes (quoting off)
    return " ".join(chosen) + " ."


def write_glue_tsvs(root: Path, words: Sequence[str], train_rows: int, dev_rows: int) -> Path:
    """RTE- and STS-B-like train/dev TSVs in the original GLUE layout (headers, string labels, float scores)."""
    for task in ("RTE", "STS-B"):
        (root / task).mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train_rows), ("dev", dev_rows)):
        lines = ["index\tsentence1\tsentence2\tlabel"]
        lines += [
            f"{i}\t{fixture_sentence(words, i)}\t{fixture_sentence(words, i + 1, 3)}\t"
            f"{'entailment' if i % 2 else 'not_entailment'}"
            for i in range(rows)
        ]
        (root / "RTE" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
        lines = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
        lines += [
            f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{fixture_sentence(words, i)}\t"
            f"{fixture_sentence(words, i + 2, 4)}\t{(i * 0.37) % 5:.3f}"
            for i in range(rows)
        ]
        (root / "STS-B" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def perturb_pad_model(model, granularity: str = "element", alpha: float = 0.5):
    """Make a PAD-MoE model's experts differ, move its scale factors off 1 and give it a mask (random element mask
    at ~40% dynamic, or every third intermediate neuron dynamic): a stand-in for a trained, partitioned model."""
    with torch.no_grad():
        for moe in model.moe_layers:
            for linear in (moe.fc_in, moe.fc_out):
                linear.expert_weight.add_(torch.randn_like(linear.expert_weight), alpha=alpha)
                linear.scale_logit.fill_(0.3)
            if granularity == "neuron":
                moe.set_neuron_mask(torch.arange(moe.fc_in.out_features) % 3 == 0)
            else:
                for linear in (moe.fc_in, moe.fc_out):
                    linear.mask.copy_(torch.rand_like(linear.mask, dtype=torch.float) < 0.4)
    return model


def count_eq4_formations(monkeypatch, granularity: str = "element") -> list[int]:
    """A one-element list counting the formations of eq. 4 from now on: per PAD weight (element-wise layers), per
    MoE layer's neuron slices (neuron-structured ones)."""
    import pad_moe_transformers as pmt
    from pad_moe_transformers.core.pad_weight import PADWeight

    owner, method = (
        (pmt.PADMoEFeedForward, "_neuron_weights") if granularity == "neuron" else (PADWeight, "_merge_experts")
    )
    calls = [0]
    original = getattr(owner, method)

    def counting(self):
        calls[0] += 1
        return original(self)

    monkeypatch.setattr(owner, method, counting)
    return calls
