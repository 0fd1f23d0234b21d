"""Training loop: AdamW, warm-up then cosine decay, periodic validation, atomic resumable checkpoints.

Batches are drawn from a generator seeded by (seed, step), so a resumed run sees exactly the
batches the uninterrupted run would have seen, and under torchrun each rank trains on its slice of
that same global batch (see distributed.py).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ._io import is_temporary, sha256_file, sigterm_as_interrupt
from .checkpoint import (CONFIG, CURRENT, OPTIMIZER, STATE, TOKENIZER, WEIGHTS, current_set, remove_stale_sets,
                         verify_set, write_set)
from .data import corpus_split, encode_text, read_text, train_tokenizer
from .distributed import DistInfo, broadcast_text, check_batch, dist_info, mean_over_ranks, start, stop
from .errors import CheckpointError, ConfigError, DataError
from .model import AlibiLM, ModelConfig

__all__ = ["TrainConfig", "TrainProgress", "train", "preflight", "prepare_output", "is_training_checkpoint",
           "CHECKPOINT_FILES"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    corpus: str
    out: str
    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = 32
    steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_tokens: int = 65536
    save_every: int = 500
    seed: int = 0
    device: str = "cpu"
    tokenizer: str | None = None  # reuse a tokenizer.json instead of training one
    save_dtype: str = "float32"  # bfloat16 / float16 halve the shipped size
    save_optimizer: bool = True

    def __post_init__(self):
        for name in ("batch_size", "steps", "eval_every", "eval_tokens", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"save_dtype must be float32, bfloat16 or float16, got {self.save_dtype!r}")


@dataclass
class TrainProgress:
    step: int
    steps: int
    loss: float
    lr: float
    tokens_per_s: float
    val_ppl: float | None = None


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def _batch(tokens: np.ndarray, step: int, cfg: TrainConfig, device,
           shard: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch (a function of seed and step only), or this rank's ``shard`` of it."""
    n = cfg.model.train_len
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(tokens) - n - 1, size=cfg.batch_size)[shard]
    window = torch.from_numpy(np.stack([tokens[s:s + n + 1] for s in starts]).astype(np.int64)).to(device)
    return window[:, :-1], window[:, 1:]  # (B, n) inputs and next-token targets


@torch.no_grad()
def evaluate(model: AlibiLM, tokens: np.ndarray, length: int, device, autocast) -> float:
    """Perplexity over non-overlapping windows of ``length`` tokens."""
    model.eval()
    n_windows = (len(tokens) - 1) // length
    total, count = 0.0, 0
    for w in range(n_windows):
        chunk = torch.from_numpy(tokens[w * length: w * length + length + 1].astype(np.int64)).to(device)
        with autocast():
            logits = model(chunk[None, :-1])
        total += torch.nn.functional.cross_entropy(logits.float()[0], chunk[1:], reduction="sum").item()
        count += length
    model.train()
    return math.exp(total / count)


# The files a training checkpoint consists of (top-level links into its current set, see checkpoint.write_set);
# an update replaces these, the `current` link and the step-* set folders, and nothing else in the folder.
CHECKPOINT_FILES = (WEIGHTS, CONFIG, TOKENIZER, STATE, OPTIMIZER)


def is_training_checkpoint(folder: Path) -> bool:
    """A folder this tool's training wrote: its trainer_state.json parses and records a training config."""
    try:
        return "train_config" in json.loads((current_set(folder) / STATE).read_text())
    except (OSError, ValueError, TypeError, CheckpointError):
        return False


def _leftovers(out: Path) -> list[str]:
    """Names in ``out`` that an interrupted save of an earlier alibi-export version left (temporaries that
    name no owner process, so they cannot be proven stale): the user is told to remove them."""
    names = [*CHECKPOINT_FILES, CURRENT]
    return sorted(p.name for p in out.iterdir() if is_temporary(p.name, names))


def prepare_output(out: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Check that training may write into ``out`` (new, empty, or this tool's checkpoint).

    A folder holding anything but this tool's checkpoint is refused: training never deletes or replaces a
    file it did not write. An existing checkpoint is continued with ``resume`` or replaced with ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o {str(out)!r} is a file. Note: expected a checkpoint folder")
    if out.is_dir():
        remove_stale_sets(out)  # what saves killed before their switch left: only ours, only of dead processes
        leftovers = _leftovers(out)
        if leftovers:
            raise ConfigError(f"-o {str(out)!r} holds temporary files of an interrupted save: {', '.join(leftovers)}. "
                              "Note: if no other alibi-export is writing there, remove those files and run again")
    contents = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if resume:
        if not is_training_checkpoint(out):
            raise CheckpointError(f"cannot resume: {str(out)!r} holds no training checkpoint ({STATE} is missing "
                                  "or unreadable)")
        return out
    if contents and not is_training_checkpoint(out):
        raise ConfigError(f"-o {str(out)!r} is not empty and not a checkpoint of alibi-export (it holds "
                          f"{', '.join(contents[:3])}{', ...' if len(contents) > 3 else ''}): refusing to write "
                          "into it. Note: choose a new or empty folder")
    if contents and not overwrite:
        raise ConfigError(f"-o {str(out)!r} already holds a checkpoint. Note: pass --resume to continue it, or "
                          "--overwrite to replace its files")
    if not out.exists() and not out.parent.is_dir():
        raise ConfigError(f"cannot create {str(out)!r}: its parent folder does not exist")
    return out  # created by the first save, so that a run that fails before it leaves nothing behind


def _save(model, tokenizer, optimizer, step: int, cfg: TrainConfig) -> None:
    """Write the checkpoint as a new set and switch to it in one rename (see checkpoint.write_set):
    trainer_state.json records the SHA-256 of the set's other files, checked whenever it is loaded."""
    from safetensors.torch import save_file

    names = [WEIGHTS, CONFIG, TOKENIZER] + ([OPTIMIZER] if cfg.save_optimizer else []) + [STATE]

    def write(tmp: dict[str, Path]) -> None:
        state = {k: v.detach().to("cpu", getattr(torch, cfg.save_dtype)).contiguous().clone()
                 for k, v in model.state_dict().items()}  # tied embeddings share storage: safetensors wants copies
        save_file(state, str(tmp[WEIGHTS]), metadata={"format": "pt"})
        tmp[CONFIG].write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        tokenizer.save(str(tmp[TOKENIZER]))
        if cfg.save_optimizer:
            tensors = {}
            for i, p in enumerate(model.parameters()):
                for key, value in optimizer.state.get(p, {}).items():
                    tensors[f"{i}.{key}"] = value.detach().float().cpu().reshape(value.shape).contiguous()
            save_file(tensors, str(tmp[OPTIMIZER]))
        record = {"step": step, "train_config": {**asdict(cfg), "model": cfg.model.to_dict()},
                  "files": {n: sha256_file(tmp[n]) for n in names if n != STATE}}
        tmp[STATE].write_text(json.dumps(record, indent=2) + "\n")

    write_set(cfg.out, step, names, write)


def _resume(model, optimizer, cfg: TrainConfig, device) -> int:
    from safetensors.torch import load_file

    files = current_set(cfg.out)
    verify_set(files)  # every file, the optimizer state too: a mixed set is refused, never resumed from
    try:
        state = json.loads((files / STATE).read_text())
        model.load_state_dict({k: v.float() for k, v in load_file(files / WEIGHTS).items()})
        tensors = load_file(files / OPTIMIZER, device=str(device))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot resume from {cfg.out!r}: {e}. Note: resuming needs {STATE} "
                              f"and {OPTIMIZER} (train with save_optimizer)") from None
    for i, p in enumerate(model.parameters()):
        slot = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}
        if slot:
            optimizer.state[p] = slot
    return int(state["step"])


# Fields a resumed run must share with the checkpoint: they define the model, the batches drawn
# and the optimisation; the rest (steps, eval/save cadence, device, output) may change.
_RESUME_FIELDS = ("batch_size", "lr", "min_lr", "warmup", "weight_decay", "grad_clip", "seed")


def _check_resume_config(cfg: TrainConfig) -> None:
    """One line naming every field in which ``cfg`` differs from the checkpoint's run."""
    try:
        saved = json.loads((current_set(cfg.out) / STATE).read_text())["train_config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot resume from {cfg.out!r}: {e}. Note: resuming needs the "
                              f"{STATE} that `train` writes") from None
    now = {**asdict(cfg), "model": cfg.model.to_dict()}
    # a field the checkpoint's config lacks was written before it existed: it holds the field's default
    defaults = ModelConfig().to_dict()
    pairs = [(f"model.{k}", saved.get("model", {}).get(k, defaults[k]), v) for k, v in now["model"].items()]
    pairs += [(k, saved.get(k), now[k]) for k in _RESUME_FIELDS]
    diff = [f"{name} (checkpoint {old!r}, now {new!r})" for name, old, new in pairs if old != new]
    if diff:
        raise ConfigError(f"cannot resume from {cfg.out!r}: the config differs from the "
                          f"checkpoint's in {', '.join(diff)}. Note: resume with the checkpoint's "
                          f"settings")


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
          on_progress: Callable[[TrainProgress], None] | None = None):
    """Train a model on ``cfg.corpus`` (a folder with train.txt / valid.txt) into ``cfg.out``.

    ``cfg.out`` must be new, empty, or this tool's checkpoint (``resume`` continues it, ``overwrite``
    replaces its files); see :func:`prepare_output`. Under torchrun (WORLD_SIZE > 1) this process is
    one rank of a data-parallel run, see :mod:`.distributed`; ``on_progress`` is called on rank 0 only."""
    with sigterm_as_interrupt():  # SIGTERM (timeout, docker stop) cleans up as Ctrl-C does
        info = preflight(cfg, resume=resume, overwrite=overwrite)
        device = start(info, torch.device(cfg.device))
        try:
            return _train(cfg, resume, on_progress, info, device)
        finally:
            stop(info)


def check_device(name: str) -> None:
    """One line for a device this run cannot use: an unknown name, or CUDA where there is none."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}. Note: expected cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r}. Note: expected cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but CUDA is not available here. Note: pass --device cpu")


def check_corpus_size(split: str, tokens: np.ndarray, cfg: TrainConfig) -> None:
    """A split must hold at least one training window (train_len + 1 tokens, and one to spare for train)."""
    need = cfg.model.train_len + (2 if split == "train" else 1)
    if len(tokens) < need:
        raise DataError(f"corpus too small: {split}.txt of {cfg.corpus!r} has {len(tokens)} tokens. Note: "
                        f"--train-len {cfg.model.train_len} needs at least {need}")


def _read_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for missing or corrupt files
        raise DataError(f"cannot read the tokenizer {str(path)!r}: {str(e).splitlines()[0]}") from None


def preflight(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> DistInfo:
    """The checks that need no data and no process group (so a bad run fails at once, on every
    rank alike, never in a hang): the output folder, the device, the batch split over the torchrun
    processes, the resume config."""
    info = dist_info()
    prepare_output(cfg.out, resume=resume, overwrite=overwrite)
    check_device(cfg.device)
    check_batch(cfg.batch_size, info)
    if resume:
        _check_resume_config(cfg)
    return info


def _load_tokenizer(cfg: TrainConfig, resume: bool, train_file, info: DistInfo, device):
    from tokenizers import Tokenizer

    if resume:
        return _read_tokenizer(current_set(cfg.out) / TOKENIZER)
    if cfg.tokenizer:
        return _read_tokenizer(cfg.tokenizer)
    # trained once, on rank 0, and sent to the others: every rank must use the same vocabulary
    trained = train_tokenizer([train_file], cfg.model.vocab_size).to_str() if info.is_main else None
    return Tokenizer.from_str(broadcast_text(trained, info, device))


def _train(cfg: TrainConfig, resume: bool, on_progress, info: DistInfo, device):
    torch.manual_seed(cfg.seed)
    train_file, valid_file = corpus_split(cfg.corpus, "train"), corpus_split(cfg.corpus, "valid")
    tokenizer = _load_tokenizer(cfg, resume, train_file, info, device)
    if tokenizer.get_vocab_size() > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.get_vocab_size()} tokens > vocab_size {cfg.model.vocab_size}")
    t0 = time.perf_counter()
    train_tokens = encode_text(tokenizer, read_text(train_file))
    valid_tokens = encode_text(tokenizer, read_text(valid_file))[: cfg.eval_tokens + 1]
    check_corpus_size("train", train_tokens, cfg)
    check_corpus_size("valid", valid_tokens, cfg)
    if info.is_main:
        log.info("tokenized %d train / %d valid tokens in %.1fs", len(train_tokens), len(valid_tokens),
                 time.perf_counter() - t0)

    model = AlibiLM(cfg.model).to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    start_step = _resume(model, optimizer, cfg, device) if resume else 0
    net = model
    if info.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    try:
        tick, tokens_seen = time.perf_counter(), 0
        for step in range(start_step, cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            x, y = _batch(train_tokens, step, cfg, device, info.shard(cfg.batch_size))
            with autocast():
                logits = net(x)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP: gradients averaged over the ranks = the global batch's gradient
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            loss = mean_over_ranks(loss, info)
            tokens_seen += x.numel() * info.world
            last = step + 1 == cfg.steps
            if not info.is_main:
                continue
            val_ppl = None
            if (step + 1) % cfg.eval_every == 0 or last:
                val_ppl = evaluate(model, valid_tokens, cfg.model.train_len, device, autocast)
                log.info("step %d: val ppl %.2f", step + 1, val_ppl)
            if on_progress:
                elapsed = time.perf_counter() - tick
                on_progress(TrainProgress(step + 1, cfg.steps, loss.item(), lr_at(step, cfg),
                                          tokens_seen / max(elapsed, 1e-9), val_ppl))
            if (step + 1) % cfg.save_every == 0 or last:
                _save(model, tokenizer, optimizer, step + 1, cfg)
    finally:
        del net  # not kept alive by a traceback: distributed.stop() must be able to free it
    return model.eval(), tokenizer


def checkpoint_step(out: str | Path) -> int | None:
    """The step a training checkpoint in ``out`` reached (None: no readable checkpoint there), so that a resumed run
    whose --steps it already reached can say there is nothing to do instead of pretending to write."""
    try:
        return int(json.loads((Path(out) / STATE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_embed_scale(out: str | Path) -> float | None:
    """The embed_scale of the training checkpoint in ``out`` (1 where its config predates the field), or None
    where there is no readable checkpoint (resuming then fails with its own message)."""
    try:
        model = json.loads((current_set(out) / STATE).read_text())["train_config"]["model"]
        return float(model.get("embed_scale", ModelConfig().embed_scale))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, CheckpointError):
        return None


def training_bytes(model_cfg: ModelConfig, batch_size: int) -> int:
    """A lower estimate of training's peak memory: float32 weights, gradients and AdamW's two moments (16 bytes
    per parameter), and one layer's activations and the logits of a batch (float32)."""
    d, ff, v, n = model_cfg.d_model, model_cfg.d_ff, model_cfg.vocab_size, model_cfg.n_layer
    params = v * d + n * (4 * d * d + 2 * d * ff)
    tokens = batch_size * model_cfg.train_len
    return 16 * params + 4 * tokens * (v + 16 * d + 2 * ff) + 4 * batch_size * model_cfg.n_head * model_cfg.train_len ** 2
