"""What a task evaluates on: a user's text whole, never silently cut."""

import pytest

from bitsmith.evaluation.tasks import TextEmbeddingTask


def test_every_line_of_a_users_text_is_evaluated(minilm, tmp_path):
    _, tokenizer, _, _ = minilm
    lines = [f"Sentence number {i} about lists, dicts and sets." for i in range(150)]
    lines.append("word " * 700)  # longer than the model's 512 tokens: cut there, and counted
    (tmp_path / "text.txt").write_text("\n".join(lines) + "\n")
    task = TextEmbeddingTask(tokenizer, tmp_path / "text.txt")
    assert len(task.sentences) == 151  # not the first 64
    assert [len(b["input_ids"]) for b in task.batches] == [64, 64, 23]
    assert task.truncated == 1 and task.max_length == 512


def test_fidelity_covers_all_sentences(minilm, tmp_path):
    model, tokenizer, _, _ = minilm
    (tmp_path / "text.txt").write_text("\n".join(f"Line {i} of the text." for i in range(70)) + "\n")
    task = TextEmbeddingTask(tokenizer, tmp_path / "text.txt")
    result = task.fidelity(model, model)
    assert result["sentences"] == 70 and result["truncated_sentences"] == 0
    assert result["batch_shape"][0] == 64  # the timed batch: the first 64
    assert result["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
