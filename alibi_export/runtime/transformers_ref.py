"""transformers' own forward of a local Hugging Face folder as a Polygraphy runner: the independent reference.

``alibi-export validate --reference transformers`` compares an export with the model as its authors'
library computes it, not with this project's re-implementation (the default ``pytorch`` reference).
transformers is an optional extra (``[hf]``) imported only here, only when this reference is asked for.
"""
from __future__ import annotations

import contextlib
import json
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from ..errors import CheckpointError, MissingDependencyError

__all__ = ["TransformersRunner", "hf_model_type", "configured_mpt_bias"]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("transformers", "hf", "--reference transformers") from None
    return transformers


class TransformersRunner(BaseRunner):
    """``AutoModelForCausalLM`` from ``folder`` (local files only, float32, CPU): ``input_ids`` -> ``logits``.

    Where transformers' code cannot serve as the reference as it stands, the model is loaded so that it can,
    never so that it matches the export more loosely:

    - Falcon-ALiBi runs with ``attn_implementation="sdpa"``: before transformers 5.25 its eager Falcon added the
      ALiBi bias twice (found by tests/test_hf_models.py); sdpa is right in every version we support.
    - MPT cannot run past ``max_seq_len`` (transformers builds its bias as a (heads, 1, max_seq_len) tensor),
      so ``max_seq_len`` in the loaded config is raised to ``max_len``, the longest validated length. ALiBi's
      slopes do not read it: the model is the same.
    - transformers' MptModel builds its bias with ``alibi_bias_max`` 8 whatever ``attn_config`` says; MosaicML's
      code, and so the trained models and the export, use the configured value. The model calls transformers'
      own ``build_mpt_alibi_tensor`` with that value (:func:`configured_mpt_bias`).
    """

    def __init__(self, folder: str | Path, *, max_len: int, name: str = "transformers"):
        super().__init__(name=name, prefix="transformers-runner")
        self.folder, self.max_len = Path(folder), max_len
        self.model_type = hf_model_type(self.folder)
        _transformers()  # fail here, in one line, before any work

    def activate_impl(self):
        import torch

        extra = {"attn_implementation": "sdpa"} if self.model_type == "falcon" else {}
        if self.model_type == "mpt":
            max_seq_len = json.loads((self.folder / "config.json").read_text()).get("max_seq_len", 2048)
            extra["max_seq_len"] = max(max_seq_len, self.max_len)
        with _quiet(_transformers()):  # its loading bar and notes would break the CLI's one-line stderr
            self.model = _transformers().AutoModelForCausalLM.from_pretrained(
                self.folder, local_files_only=True, dtype=torch.float32, **extra).eval()
        if self.model_type == "mpt":
            configured_mpt_bias(self.model)

    def get_input_metadata_impl(self):
        return TensorMetadata().add("input_ids", dtype=np.int64, shape=["batch", "sequence"])

    def infer_impl(self, feed_dict):
        import torch

        ids = torch.as_tensor(np.asarray(feed_dict["input_ids"]), dtype=torch.int64)
        start = time.perf_counter()
        with torch.inference_mode():
            logits = self.model(ids).logits
        self.inference_time = time.perf_counter() - start
        return OrderedDict(logits=logits.float().numpy())

    def deactivate_impl(self):
        del self.model


@contextlib.contextmanager
def _quiet(transformers):
    """transformers' progress bars off and its log at ERROR for the block; both restored after."""
    logging, bars = transformers.utils.logging, transformers.utils.logging.is_progress_bar_enabled()
    verbosity = logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def hf_model_type(folder: Path) -> str:
    """The folder's ``model_type``; a folder that is not a Hugging Face one is refused in one line."""
    from ..checkpoint import _read_json
    from ..hf import ARCHITECTURES, is_hf_config

    data = _read_json(folder)
    if not is_hf_config(data):
        raise CheckpointError(f"--reference transformers needs a Hugging Face model folder, and {str(folder)!r} is "
                              "this project's checkpoint (its config.json names no model_type). Note: validate it "
                              "with --reference pytorch")
    if data["model_type"] not in ARCHITECTURES:
        raise CheckpointError(f"unsupported model_type {data['model_type']!r} in {str(folder)!r}. Note: expected one "
                              f"of {ARCHITECTURES}")
    return data["model_type"]


def configured_mpt_bias(model) -> None:
    """Make a transformers MPT build its ALiBi bias with its configured ``alibi_bias_max`` (it passes 8)."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    bias_max = model.config.attn_config.alibi_bias_max
    model.transformer.build_mpt_alibi_tensor = (
        lambda n, length, alibi_bias_max=8, device=None: build_mpt_alibi_tensor(n, length, bias_max, device))
