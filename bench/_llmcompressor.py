"""What the scripts run in llm-compressor's own venv share (llmcompressor_gptq.py, llmcompressor_prune.py):
its log kept off stdout, the calibration windows as a datasets.Dataset, one timed ``oneshot`` call, and the
process's peak memory. No bitsmith import: that venv does not have it."""

from __future__ import annotations

import contextlib
import sys
import time


def quiet_logs(json_only: bool):
    """llm-compressor logs to stdout by default (its loguru sink is added at import time and some messages are
    emitted during import): its log goes to stderr, so stdout holds only the result line. Returns the module."""
    with contextlib.redirect_stdout(sys.stderr):
        import llmcompressor
        from llmcompressor.logger import LoggerConfig, configure_logger, logger

        configure_logger(LoggerConfig(console_log_level=None))
    logger.add(sys.stderr, level="WARNING" if json_only else "INFO")
    return llmcompressor


def calibration(path: str):
    """(Dataset of input_ids and attention_mask, windows, tokens per window) from a .pt LongTensor (N, L)."""
    import torch
    from datasets import Dataset

    ids = torch.load(path)
    if isinstance(ids, dict):
        ids = ids["input_ids"]
    if ids.dim() != 2:
        raise SystemExit(f"--calib: expected a 2-D tensor, got shape {tuple(ids.shape)}")
    n, seq_len = ids.shape
    ids = ids.long()
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    return data, n, seq_len


def timed_oneshot(model_dir: str, recipe, data, n: int, seq_len: int, **options):
    """Load the float model, run ``oneshot`` on the windows (its own output to stderr); returns (model,
    tokenizer, wall seconds, process CPU seconds) of the oneshot call alone."""
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=None)
    model.to("cpu").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(sys.stderr):  # its progress bars and notices
        model = oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe, num_calibration_samples=n,
                        max_seq_length=seq_len, shuffle_calibration_samples=False, **options)
    # process CPU seconds count all threads; they inflate too on a busy machine
    return model, tokenizer, time.perf_counter() - t0, time.process_time() - c0


def save(model, tokenizer, out: str) -> None:
    with contextlib.redirect_stdout(sys.stderr):
        model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
