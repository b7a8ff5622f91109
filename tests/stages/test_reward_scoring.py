"""The one reward-model scorer (stages/reward_scoring.py): batched scores equal one-by-one scores of the
same chat-template rendering, and truncation keeps a conversation's start."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def reward_folder(tiny_base, tmp_path_factory):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    out = tmp_path_factory.mktemp("reward-scoring") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


CONVERSATIONS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                 for q, a in (("47+38=", "85"), ("47+38=", "75"), ("1+2=", "3"), ("12+34=", "a much longer answer"))]


def test_batched_scores_match_one_by_one_plain_transformers(reward_folder):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stages.reward_scoring import RewardScorer

    scorer = RewardScorer(reward_folder, batch_size=3, device="cpu")  # 2 batches, padded to different widths
    batched = scorer.score(CONVERSATIONS)
    tokenizer = AutoTokenizer.from_pretrained(reward_folder)
    model = AutoModelForSequenceClassification.from_pretrained(reward_folder).eval()
    with torch.no_grad():
        alone = [model(**tokenizer.apply_chat_template(c, return_tensors="pt", return_dict=True)).logits.item()
                 for c in CONVERSATIONS]
    assert batched == pytest.approx(alone, abs=1e-5)
    assert len(set(round(s, 4) for s in alone)) == len(alone)  # the random head tells them apart


def test_truncation_keeps_the_start(reward_folder):
    from stages.reward_scoring import RewardScorer

    full = RewardScorer(reward_folder, device="cpu")
    ids = full.encode(CONVERSATIONS[3])
    cut = RewardScorer(reward_folder, max_length=10, device="cpu")
    assert len(ids) > 10
    assert cut.score([CONVERSATIONS[3]]) == pytest.approx(full.score_ids([ids[:10]]), abs=1e-6)
