"""What "evaluate" and "calibrate" mean for each kind of model.

    task                  | models                         | fidelity                         | calibration default
      text-embedding      | minilm, transformers encoders  | mean / min cosine to float       | 128 Python-doc paragraphs
      image-classification| digits-cnn                     | test-split accuracy (both)       | first 128 training images
      language-model      | docs-lm, transformers *ForCausalLM | held-out perplexity (both)   | 128 training documents
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bitsmith.evaluation.calibration_data import read_calibration
from bitsmith.evaluation.measure import cosine_fidelity, eval_sentences, read_sentences, read_text
from bitsmith.errors import BitsmithError

__all__ = ["TextEmbeddingTask", "ImageClassificationTask", "LanguageModelTask", "TASKS", "register_task", "task_for"]

CALIB_SAMPLES = 128
CALIB_BATCH = 16


def _is_causal_lm(model: nn.Module | None) -> bool:
    architectures = getattr(getattr(model, "config", None), "architectures", None) or []
    return any(a.endswith("ForCausalLM") for a in architectures) or type(model).__name__.endswith("ForCausalLM")


class TextEmbeddingTask:
    name = "text-embedding"
    evaluation = "cosine of mean-pooled sentence embeddings to the float model"
    batch_size = 64  # sentences per forward; the first batch is the one timed

    @staticmethod
    def claims(model) -> bool:
        return True  # any text model that is no causal LM: compare its embeddings

    def __init__(self, tokenizer, text: str | Path | None = None):
        if tokenizer is None:
            raise BitsmithError("this model has no tokenizer: bitsmith's text evaluation needs one")
        from bitsmith.zoo.minilm import encode_batch

        self.tokenizer = tokenizer
        # a user's file is evaluated whole, one sentence per line; the default is 64 documentation paragraphs
        self.sentences = read_sentences(text, limit=None) if text else eval_sentences(None)
        self.max_length = _max_tokens(tokenizer)
        lengths = [len(ids) for ids in tokenizer(self.sentences, truncation=False)["input_ids"]]
        self.truncated = sum(length > self.max_length for length in lengths)
        self.batches = [encode_batch(tokenizer, self.sentences[i : i + self.batch_size], self.max_length)
                        for i in range(0, len(self.sentences), self.batch_size)]
        self.batch = self.batches[0]

    def calibration(self, path: str | Path | None, samples: int = CALIB_SAMPLES) -> list[dict]:
        from bitsmith.zoo.minilm import encode_batch
        from bitsmith.zoo.text import doc_sentences

        texts = read_calibration(path, samples) if path else doc_sentences(samples, split="calib")
        if not all(isinstance(t, str) for t in texts):
            raise BitsmithError("this is a text model: give text calibration data (a .txt or .jsonl file)")
        return [encode_batch(self.tokenizer, texts[i : i + CALIB_BATCH], self.max_length)
                for i in range(0, len(texts), CALIB_BATCH)]

    def runner(self, model: nn.Module):
        from bitsmith.zoo.minilm import sentence_embeddings

        return lambda: sentence_embeddings(model, self.batch)

    def _embed_all(self, model: nn.Module) -> torch.Tensor:
        from bitsmith.zoo.minilm import sentence_embeddings

        return torch.cat([sentence_embeddings(model, batch) for batch in self.batches])

    metric = "1 - mean cosine"
    target_metric = "cosine"  # what ``bitsmith tune --target`` names for this task

    def judge(self, float_model: nn.Module, limit: int | None = None):
        """model -> harm against ``float_model`` (1 - mean cosine of the embeddings), the float ones computed once."""
        reference = self._embed_all(float_model)
        return lambda model: 1.0 - cosine_fidelity(self._embed_all(model), reference)["mean_cosine"]

    def fidelity(self, float_model: nn.Module, quant_model: nn.Module) -> dict:
        result = cosine_fidelity(self._embed_all(quant_model), self._embed_all(float_model))
        return {"sentences": len(self.sentences), "batch_shape": list(self.batch["input_ids"].shape),
                "truncated_sentences": self.truncated, "max_tokens": self.max_length, **result}

    def export_example(self) -> tuple[dict, list[str]]:
        """(a real input to trace, the output names) for ONNX export."""
        return {name: tensor[:2] for name, tensor in self.batch.items()}, ["last_hidden_state"]

    def own_figures(self, model: nn.Module) -> dict:
        """A float model on its own has no fidelity to report: just what it was evaluated on."""
        return {"sentences": len(self.sentences), "batch_shape": list(self.batch["input_ids"].shape)}


def _max_tokens(tokenizer, cap: int = 512) -> int:
    """The longest input the tokenizer allows (transformers uses a huge number for "no limit"), at most ``cap``."""
    limit = getattr(tokenizer, "model_max_length", cap) or cap
    return int(min(limit, cap))


class ImageClassificationTask:
    name = "image-classification"
    evaluation = "test-split accuracy of the digits classifier"

    @staticmethod
    def claims(model) -> bool:
        return False  # digits-cnn only, by its zoo entry

    def __init__(self, tokenizer=None, text: str | Path | None = None):
        from bitsmith.zoo.digits import digits_data, example_input

        if text is not None:
            raise BitsmithError("--text applies to text models; digits-cnn is evaluated on its test split")
        self.x_test, self.y_test = digits_data("test")
        self.batch = example_input(64)

    def calibration(self, path: str | Path | None, samples: int = CALIB_SAMPLES) -> list[torch.Tensor]:
        from bitsmith.zoo.digits import calibration_data

        if path is None:
            images = calibration_data(samples)
        else:
            items = read_calibration(path, samples)
            if isinstance(items[0], str):
                raise BitsmithError("this is an image model: give images or .npy/.pt tensors as calibration data")
            images = torch.stack([_as_digit_image(t) for t in items])
        return list(images.split(32))

    def runner(self, model: nn.Module):
        def run():
            with torch.inference_mode():
                return model(self.batch)

        return run

    def export_example(self) -> tuple[torch.Tensor, list[str]]:
        return self.batch[:2], ["logits"]

    def own_figures(self, model: nn.Module) -> dict:
        from bitsmith.zoo.digits import accuracy

        return {"test_samples": len(self.y_test), "batch_shape": list(self.batch.shape),
                "accuracy": round(accuracy(model, self.x_test, self.y_test), 5)}

    metric = "accuracy drop (points)"
    target_metric = "accuracy_drop"

    def judge(self, float_model: nn.Module, limit: int | None = None):
        """model -> test accuracy points lost against ``float_model``."""
        from bitsmith.zoo.digits import accuracy

        with torch.inference_mode():
            base = accuracy(float_model, self.x_test, self.y_test)

        def harm(model):
            with torch.inference_mode():
                return 100 * (base - accuracy(model, self.x_test, self.y_test))

        return harm

    def fidelity(self, float_model: nn.Module, quant_model: nn.Module) -> dict:
        from bitsmith.zoo.digits import accuracy

        float_accuracy = accuracy(float_model, self.x_test, self.y_test)
        quant_accuracy = accuracy(quant_model, self.x_test, self.y_test)
        return {
            "test_samples": len(self.y_test),
            "batch_shape": list(self.batch.shape),
            "float_accuracy": round(float_accuracy, 5),
            "accuracy": round(quant_accuracy, 5),
            "accuracy_drop_points": round(100 * (float_accuracy - quant_accuracy), 3),
        }


class LanguageModelTask:
    name = "language-model"
    evaluation = "perplexity over fixed-length windows of held-out text"
    window = 256

    @staticmethod
    def claims(model) -> bool:
        return _is_causal_lm(model)

    def __init__(self, tokenizer, text: str | Path | None = None):
        from bitsmith.zoo.docs_lm import heldout_text

        if tokenizer is None:
            raise BitsmithError("this language model has no tokenizer files")
        self.tokenizer = tokenizer
        self.text = read_text(text) if text else heldout_text()
        ids = tokenizer(self.text, return_tensors="pt")["input_ids"][0]
        rows = min(8, len(ids) // self.window)
        if rows == 0:
            raise BitsmithError(f"text too short for one window of {self.window} tokens")
        self.batch = {"input_ids": ids[: rows * self.window].reshape(rows, self.window)}  # (rows, window)

    def calibration(self, path: str | Path | None, samples: int = CALIB_SAMPLES) -> list[dict]:
        from bitsmith.zoo.docs_lm import calibration_texts

        texts = read_calibration(path, samples) if path else calibration_texts(samples)
        if not all(isinstance(t, str) for t in texts):
            raise BitsmithError("this is a language model: give text calibration data (a .txt or .jsonl file)")
        ids = self.tokenizer("\n\n".join(texts), return_tensors="pt")["input_ids"][0]
        rows = max(1, min(samples, len(ids) // self.window))
        windows = ids[: rows * self.window].reshape(rows, self.window) if len(ids) >= self.window else ids[None]
        return [{"input_ids": chunk} for chunk in windows.split(8)]

    def runner(self, model: nn.Module):
        def run():
            with torch.inference_mode():
                return model(**self.batch).logits

        return run

    def export_example(self) -> tuple[dict, list[str]]:
        # an explicit mask: without one transformers looks for packed sequences with aten::diff, which the
        # ONNX exporter has no symbolic for (and a mask is what ONNX Runtime's LM pipelines feed anyway)
        ids = self.batch["input_ids"][:2, :32]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ["logits"]

    def own_figures(self, model: nn.Module) -> dict:
        from bitsmith.zoo.docs_lm import perplexity

        result = perplexity(model, self.tokenizer, self.text, window=self.window)
        return {"batch_shape": list(self.batch["input_ids"].shape), "tokens": result["tokens"],
                "windows": result["windows"], "perplexity": round(result["perplexity"], 4)}

    metric = "perplexity increase (%)"
    target_metric = "perplexity_increase"

    def judge(self, float_model: nn.Module, limit: int | None = None):
        """model -> % perplexity increase over ``float_model`` on the held-out text (its first ``limit`` windows)."""
        from bitsmith.zoo.docs_lm import perplexity

        score = lambda model: perplexity(model, self.tokenizer, self.text, window=self.window,  # noqa: E731
                                         max_windows=limit)["perplexity"]
        base = score(float_model)
        return lambda model: 100 * (score(model) / base - 1)

    def fidelity(self, float_model: nn.Module, quant_model: nn.Module) -> dict:
        from bitsmith.zoo.docs_lm import perplexity

        base = perplexity(float_model, self.tokenizer, self.text, window=self.window)
        result = perplexity(quant_model, self.tokenizer, self.text, window=self.window)
        return {
            "batch_shape": list(self.batch["input_ids"].shape), "tokens": result["tokens"],
            "float_perplexity": round(base["perplexity"], 4), "perplexity": round(result["perplexity"], 4),
            "perplexity_increase_pct": round(100 * (result["perplexity"] / base["perplexity"] - 1), 3),
        }


def _as_digit_image(sample: torch.Tensor) -> torch.Tensor:
    """Any (H, W), (1, H, W) or (C, H, W) image in [0, 1] (or 0..16 / 0..255) -> (1, 32, 32) like digits_data."""
    image = sample.float()
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3:
        raise BitsmithError(f"calibration image has shape {list(sample.shape)}; expected (H, W) or (C, H, W)")
    image = image.mean(0, keepdim=True)
    if image.max() > 1.0:
        image = image / (16.0 if image.max() <= 16.0 else 255.0)
    return nn.functional.interpolate(image[None], size=(32, 32), mode="bilinear", align_corners=False)[0]


TASKS: dict[str, type] = {}


def register_task(task: type) -> type:
    """A task class: ``name``, ``evaluation``, ``claims(model)`` (whether a model that is no zoo entry is of this
    kind; the first registered task that claims it wins), and calibration / runner / fidelity / own_figures."""
    TASKS[task.name] = task
    return task


for _task in (LanguageModelTask, ImageClassificationTask, TextEmbeddingTask):
    register_task(_task)


def task_for(source: dict, tokenizer=None, text=None, model: nn.Module | None = None):
    """The task of a model: its zoo entry's, else the first registered task that claims it."""
    from bitsmith.zoo import ZOO

    name = source.get("name") if source.get("kind") == "zoo" else None
    if name in ZOO:
        task = TASKS[ZOO[name].task]
    else:
        task = next(t for t in TASKS.values() if t.claims(model))
    return task(tokenizer, text)
