"""PromptDataset: length filter, per-epoch reshuffle, host shards, exact resume."""

import json

import pytest

from prime_jax.data.dataset import PromptDataset
from prime_jax.data.synthetic import make_tasks


@pytest.fixture(scope="module")
def tasks():
    return make_tasks(40, seed=0, difficulty=2)


def _uids(items):
    return [ex.uid for ex, _ in items]


def test_length_filter_and_ids(tasks, sp_tokenizer):
    lengths = {
        t.uid: len(sp_tokenizer.encode(sp_tokenizer.apply_chat_template(t.prompt, add_generation_prompt=True)))
        for t in tasks
    }
    limit = sorted(lengths.values())[len(tasks) // 2]
    ds = PromptDataset(tasks, sp_tokenizer, max_prompt_len=limit, seed=0)
    kept = {u for u, n in lengths.items() if n <= limit}
    assert len(ds) == len(kept) and ds.skipped["prompt_too_long"] == len(tasks) - len(kept)
    items = ds.next_prompts(len(ds))
    assert set(_uids(items)) == kept
    for ex, ids in items:
        text = sp_tokenizer.apply_chat_template(ex.prompt)
        assert text.endswith("<|im_start|>assistant\n")
        assert ids == sp_tokenizer.encode(text)
    with pytest.raises(ValueError, match="no prompts"):
        PromptDataset(tasks, sp_tokenizer, max_prompt_len=1, seed=0)


def test_epochs_are_reshuffled_permutations(tasks, sp_tokenizer):
    ds = PromptDataset(tasks, sp_tokenizer, max_prompt_len=1000, seed=1)
    e0, e1 = _uids(ds.next_prompts(40)), _uids(ds.next_prompts(40))
    assert sorted(e0) == sorted(e1) == sorted(t.uid for t in tasks)
    assert e0 != e1 and ds.epoch == 1
    again = PromptDataset(tasks, sp_tokenizer, max_prompt_len=1000, seed=1)
    assert _uids(again.next_prompts(80)) == e0 + e1
    other = PromptDataset(tasks, sp_tokenizer, max_prompt_len=1000, seed=2)
    assert _uids(other.next_prompts(40)) != e0


def test_resume_continues_at_the_same_prompt(tasks, sp_tokenizer):
    ds = PromptDataset(tasks, sp_tokenizer, max_prompt_len=1000, seed=3)
    ds.next_prompts(33)
    state = json.loads(json.dumps(ds.state()))
    expected = ds.next_prompts(90)  # crosses two epoch boundaries
    resumed = PromptDataset(tasks, sp_tokenizer, max_prompt_len=1000, seed=3)
    resumed.restore(state)
    assert resumed.next_prompts(90) == expected
    mismatched = PromptDataset(tasks, sp_tokenizer, max_prompt_len=1000, seed=4)
    with pytest.raises(ValueError, match="seed"):
        mismatched.restore(state)


def test_shards_are_disjoint_and_cover(tasks, sp_tokenizer):
    shards = [
        PromptDataset(tasks, sp_tokenizer, max_prompt_len=1000, seed=5, shard_index=i, num_shards=3)
        for i in range(3)
    ]
    seen = [set(_uids(s.next_prompts(len(s)))) for s in shards]
    assert [len(s) for s in seen] == [14, 13, 13]
    assert set.union(*seen) == {t.uid for t in tasks} and sum(map(len, seen)) == 40
    with pytest.raises(ValueError, match="shard_index"):
        PromptDataset(tasks, sp_tokenizer, max_prompt_len=1000, seed=5, shard_index=3, num_shards=3)
