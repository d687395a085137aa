"""Transformers model directories read without running their code, and the one float-skeleton builder.

``float_skeleton`` is how bitsmith makes an untrained model of a config before its weights are read: with
parameters on the ``meta`` device (no memory; loaded later with ``assign=True``: ``bitsmith.load`` and the
block-by-block pipeline), or in real memory without the random initialization (``on_meta=False``: reading a
compressed-tensors directory, whose float tensors are copied in).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from bitsmith.errors import BitsmithError

__all__ = ["read_model_config", "is_causal_lm_dir", "build_on_meta", "float_skeleton", "first_line"]


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _remote_code_refusal(path: Path) -> str | None:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(config, dict) and config.get("auto_map"):
        return (f"{path} needs Python code of its own (config.json auto_map) for its model type; bitsmith never"
                " runs code from a model directory")
    return None


def read_model_config(path: Path):
    """The transformers config of ``path``, read without running any code from the directory."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as err:
        refusal = _remote_code_refusal(path)
        raise BitsmithError(refusal or f"cannot read {path / 'config.json'}: {first_line(err)}") from None


def is_causal_lm_dir(path: Path) -> bool:
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(architectures, list) and any(str(a).endswith("ForCausalLM") for a in architectures)


@contextlib.contextmanager
def build_on_meta():
    """Inside, every nn.Parameter registered goes to the ``meta`` device; buffers stay real (rotary tables,
    which are not in checkpoints)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def float_skeleton(config, model_class: type | None = None, *, causal: bool = False, on_meta: bool = True,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """An untrained model of the transformers ``config``: of ``model_class``, else AutoModelForCausalLM
    (``causal``) or AutoModel, in ``dtype`` (default: the config's). See the module docstring for ``on_meta``."""
    import transformers

    def make():
        if model_class is not None:
            return model_class(config)
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        options = {} if dtype is None else {"dtype": dtype}
        return auto.from_config(config, trust_remote_code=False, **options)

    if on_meta:
        with build_on_meta():
            return make()
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialize, only slower
        no_init_weights = contextlib.nullcontext
    with no_init_weights():  # every weight comes from the checkpoint: skip the random initialization
        model = make()
    model.tie_weights()  # skipped with the initialization; ties lm_head to the embedding where the config says so
    return model
