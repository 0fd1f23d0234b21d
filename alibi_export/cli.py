"""`alibi-export`: thin click commands over the library; every error a user can cause is one line."""
from __future__ import annotations

import errno
import functools
import logging
import signal
import sys
from pathlib import Path

import click

from .errors import AlibiExportError
from .sizes import MAX_VOCAB_SIZE
from .shipped import default_model, default_text


def _lengths(ctx, param, value):
    """--lengths: token counts or multiples of the training length (4x); resolved once the model is known."""
    from .sizes import parse_lengths

    if value is None:
        return None
    try:
        return parse_lengths(value)
    except AlibiExportError as e:
        raise click.BadParameter(str(e)) from None


def _window_or_exact(ctx, param, value):
    """--kv-window of ppl: a positive number of tokens, or "exact" (proved from the checkpoint's weights)."""
    if value is None or value == "exact":
        return value
    try:
        window = int(value)
    except ValueError:
        window = 0
    if window < 1:
        raise click.BadParameter(f"{value!r} is neither a positive number of tokens nor 'exact'")
    return window


def _nonempty_path(ctx, param, value):
    """An output path given as '' is a mistake (it would fall back to a default name), not a request."""
    if value is not None and not str(value).strip():
        raise click.BadParameter("is an empty path. Note: expected a file or folder name")
    return value


def _positive_finite(ctx, param, value):
    import math

    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"expected a positive finite number, got {value}")
    return value


SEED = click.IntRange(0, 2**64 - 1)  # what torch.manual_seed and NumPy's generators accept
LENGTHS_HELP = ("Comma-separated lengths: token counts or multiples of the training length such as 4x "
                "(default: 1x,2x,4x,8x,16x")


# Operating-system errors a user causes or can fix: a wrong path, permissions, a full or read-only disk.
_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _one_line_errors(fn):
    """User mistakes become `Error: ...` and exit 1, never a traceback.

    Anything else is a bug: one line that says so, and with -v (--verbose) its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise  # click's own ways out
        except (AlibiExportError, *_USER_OS_ERRORS) as e:
            raise click.ClickException(_first_line(e)) from None
        except ModuleNotFoundError as e:
            missing = _missing_requirement(e)
            if missing is None:
                raise _internal_error(e) from None
            raise click.ClickException(f"the package {missing!r}, which alibi-export requires, is not installed. "
                                       f"Note: the install is incomplete; pip install 'alibi-export' (or "
                                       f"'{missing}') installs it") from None
        except Exception as e:
            if isinstance(e, OSError) and e.errno in _USER_ERRNOS:
                raise click.ClickException(_first_line(e)) from None
            raise _internal_error(e) from None

    return wrapper


def _internal_error(e: Exception) -> click.ClickException:
    """A bug: one line that says so; with -v, the exception itself (its traceback) instead."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.find_root().params.get("verbose"):
        raise e  # the traceback, for a bug report
    return click.ClickException(f"internal error: {type(e).__name__}: {_first_line(e)}. Note: this is a bug "
                                "in alibi-export; run with -v for the traceback")


def _missing_requirement(e: ModuleNotFoundError) -> str | None:
    """The distribution name when ``e`` is a package alibi-export declares (any extra) that is not installed:
    a broken install, not a bug. Optional packages raise MissingDependencyError before this."""
    import re
    from importlib import metadata

    if not e.name:
        return None
    top = e.name.split(".")[0]
    try:
        requires = metadata.requires("alibi-export") or []
    except metadata.PackageNotFoundError:
        return None
    for req in requires:
        dist = re.match(r"[A-Za-z0-9_.-]+", req).group(0)
        if dist.lower().replace("-", "_") == top.lower():
            return dist
    return None


def _aborted() -> None:
    """Ctrl-C or SIGTERM: "Aborted." and status 1.

    CPython remembers a KeyboardInterrupt that escaped code run by ``exec`` of a string (dataclasses and named
    tuples made during a lazy import run such code) even when it was caught later, and under ``python -m`` it
    then ends the process by SIGINT instead of the status chosen here. Running such code once more clears it."""
    click.echo("Aborted.", err=True)
    exec("None")
    sys.exit(1)


class _OneLineErrors(click.Group):
    """Usage errors too are one line (click would add the usage text and a hint)."""

    def __call__(self, *args, **kwargs):
        """The process's entry point (the console script, ``python -m alibi_export``): from here on SIGTERM
        (timeout, docker stop, CI cancellation) cleans up as Ctrl-C does. Not in ``main``, which in-process
        callers (click's CliRunner, tests) invoke: the handler would outlive their call."""
        from ._io import handle_sigterm

        handle_sigterm()
        try:
            return super().__call__(*args, **kwargs)
        except KeyboardInterrupt:  # it landed after main's own handling, as the command ended: still status 1
            _aborted()
        finally:  # the exit status is decided: a SIGTERM during the interpreter's shutdown cannot change it
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except click.exceptions.Abort:
            _aborted()
        except click.ClickException as e:
            click.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        sys.exit(result if isinstance(result, int) else 0)


@click.group(cls=_OneLineErrors)
@click.version_option(package_name="alibi-export")
@click.option("-v", "--verbose", is_flag=True, help="Log progress of the library; show the traceback of an "
                                                     "internal error.")
def main(verbose: bool):
    """Export ALiBi language models to ONNX and TensorRT, and prove they still extrapolate."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


@main.command()
@click.option("--corpus", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder with train.txt and valid.txt.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), callback=_nonempty_path,
              help="Checkpoint folder to write.")
@click.option("--position", default="alibi", show_default=True,
              type=click.Choice(["alibi", "sinusoidal", "rotary", "learned", "t5"]),
              help="Position method: ALiBi, or a baseline to compare its extrapolation with.")
@click.option("--train-len", default=256, show_default=True, type=click.IntRange(min=1),
              help="Training sequence length (tokens per sample).")
@click.option("--layers", default=4, show_default=True, type=click.IntRange(min=1), help="Transformer blocks.")
@click.option("--heads", default=8, show_default=True, type=click.IntRange(min=1), help="Attention heads per block.")
@click.option("--d-model", default=256, show_default=True, type=click.IntRange(min=1),
              help="Width of the residual stream (divisible by --heads).")
@click.option("--d-ff", default=768, show_default=True, type=click.IntRange(min=1), help="Width of the MLP.")
@click.option("--vocab-size", default=4096, show_default=True, type=click.IntRange(300, MAX_VOCAB_SIZE),
              help="Vocabulary of the byte-level BPE tokenizer trained on the corpus.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Sequences per step (the global batch under torchrun).")
@click.option("--steps", default=2000, show_default=True, type=click.IntRange(1, 10**9),
              help="Optimizer steps in all (a resumed run continues up to this step).")
@click.option("--lr", default=1e-3, show_default=True, type=float, callback=_positive_finite,
              help="Peak learning rate (cosine decay to a tenth of it).")
@click.option("--warmup", default=100, show_default=True, type=click.IntRange(min=0),
              help="Linear warm-up steps.")
@click.option("--eval-every", default=250, show_default=True, type=click.IntRange(min=1),
              help="Steps between validation perplexities.")
@click.option("--save-every", default=500, show_default=True, type=click.IntRange(min=1),
              help="Steps between checkpoint saves (the last step is always saved).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the initialization and the batches.")
@click.option("--embed-scale", default=None,
              help="Factor on the token embeddings: sqrt-d (the paper's recipe; a new sinusoidal run's default) or "
                   "a number (1: the default of the other methods, and the recipe of models trained before this "
                   "option, the shipped ones among them). Default with --resume: the checkpoint's.")
@click.option("--device", default=None,
              help="cpu or cuda (default: cuda when available).")
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False), help="Reuse this tokenizer.json.")
@click.option("--save-dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16"]), help="Dtype of the saved weights.")
@click.option("--no-optimizer", is_flag=True, help="Do not store optimizer state (smaller; no resume).")
@click.option("--resume", is_flag=True, help="Continue the run stored in --out.")
@click.option("--overwrite", is_flag=True, help="Replace the checkpoint stored in --out (only its own files).")
@_one_line_errors
def train(corpus, out, position, train_len, layers, heads, d_model, d_ff, vocab_size, batch_size, steps, lr,
          warmup, eval_every, save_every, seed, embed_scale, device, tokenizer, save_dtype, no_optimizer, resume,
          overwrite):
    """Train an LM with the chosen position method; checkpoints are safetensors.

    Multi-GPU: `torchrun --nproc_per_node N -m alibi_export train ...` (data parallel; the batch
    size is the global batch, split over the N processes)."""
    import torch

    from .distributed import dist_info
    from .model import ModelConfig, default_embed_scale, embed_scale_of
    from .progress import progress
    from .sizes import check_fits
    from .train import (TrainConfig, checkpoint_embed_scale, checkpoint_step, preflight, train as run_training,
                        training_bytes)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if embed_scale is None:  # a run begun before the option resumes with its own recipe
        embed_scale = (checkpoint_embed_scale(out) if resume else None) or default_embed_scale(position)
    model_cfg = ModelConfig(vocab_size=vocab_size, n_layer=layers, n_head=heads, d_model=d_model, d_ff=d_ff,
                            position=position, train_len=train_len, max_positions=train_len,
                            embed_scale=embed_scale_of(embed_scale, d_model))
    check_fits(training_bytes(model_cfg, batch_size), f"training {layers} layers of width {d_model} on batches of "
               f"{batch_size} x {train_len} tokens with a vocabulary of {vocab_size}",
               "choose a smaller model, batch or vocabulary")
    cfg = TrainConfig(corpus=corpus, out=out, model=model_cfg, batch_size=batch_size, steps=steps, lr=lr,
                      min_lr=lr / 10, warmup=warmup, eval_every=eval_every, save_every=save_every, seed=seed,
                      device=device, tokenizer=tokenizer, save_dtype=save_dtype, save_optimizer=not no_optimizer)
    if not dist_info().is_main:  # a torchrun rank > 0: rank 0 alone reports progress and errors
        try:
            run_training(cfg, resume=resume, overwrite=overwrite)
        except AlibiExportError:  # checked identically on every rank; rank 0 prints it
            sys.exit(1)
        return
    preflight(cfg, resume=resume, overwrite=overwrite)  # before the progress bar: a bad run is one line
    reached = checkpoint_step(out) if resume else None
    if reached is not None and reached >= steps:
        click.echo(f"nothing to do: {out} is at step {reached} already, and --steps is {steps}. Note: pass a larger "
                   "--steps to train on")
        return
    with progress(desc=f"training {position}", total=steps, unit="step") as bar:

        def on_progress(p):
            bar.update(p.step - bar.n)  # a resumed run starts past step 0
            bar.set_postfix_str(f"loss {p.loss:.3f}, {p.tokens_per_s:,.0f} tok/s", refresh=False)
            if p.val_ppl is not None:  # evaluations are a log line, terminal or not
                bar.write(f"step {p.step}: loss {p.loss:.3f} val_ppl {p.val_ppl:.2f}", file=sys.stderr)

        run_training(cfg, resume=resume, overwrite=overwrite, on_progress=on_progress)
    click.echo(f"wrote {out}")


def _default_model(model):
    if model:
        return Path(model)
    shipped = default_model()  # package data: found wherever the package is installed
    if not shipped.is_dir():
        raise click.ClickException(f"no MODEL given and the default model {shipped} is missing. "
                                   "Note: pass a checkpoint folder")
    return shipped


def _print_parity(result, ppl_onnx=None, ppl_torch=None, train_len=None):
    has_ppl = ppl_onnx is not None
    head = f"{'length':>7} {'x train':>7} {'max|dlogit|':>11} {'rel err':>8} {'argmax':>7}"
    head += f" {'ppl ORT':>9} {'ppl torch':>9}" if has_ppl else ""
    click.echo(head)
    for i, r in enumerate(result.lengths):
        mult = f"{r.length / train_len:g}x" if train_len else ""
        line = f"{r.length:>7} {mult:>7} {r.max_abs:>11.2e} {r.max_rel:>8.1e} {r.argmax_agreement:>7.2%}"
        if has_ppl:
            line += f" {ppl_onnx[i].ppl:>9.2f} {ppl_torch[i].ppl:>9.2f}"
        click.echo(line + ("" if r.passed else "  FAIL"))
    verdict = "PASS" if result else "FAIL"
    click.echo(f"parity {verdict} (Polygraphy, atol {result.atol:g}, rtol {result.rtol:g})")


def _read_text_option(text):
    """--text read and decoded now, before any work: a typo fails in one line and writes nothing."""
    from .data import read_text

    if text is not None:
        read_text(text)
    return text


@main.command()
@click.argument("model", required=False, type=click.Path())
@click.option("-o", "--out", type=click.Path(), callback=_nonempty_path,
              help="ONNX file to write (default: MODEL_NAME.onnx), or with --genai the folder (default: "
                   "MODEL_NAME-genai). It is replaced only once the new export has passed its check.")
@click.option("--target", type=click.Choice(["cpu", "cuda", "tensorrt-rtx", "genai"]),
              help="Pick the form, dtype, fusions and quantization measured best for this runtime (explicit "
                   "options override it).")
@click.option("--dynamic-len/--fixed-len", default=True, show_default=True,
              help="Dynamic batch and sequence, the ALiBi bias built from the runtime length (the default), or "
                   "a graph fixed to --batch x --seq-len.")
@click.option("--opset", type=click.IntRange(1, 99), help="ONNX opset (default: 18; 23 for --attention onnx).")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16"]),
              help="Precision of the weights and activations.")
@click.option("--attention", default="decomposed", show_default=True, type=click.Choice(["decomposed", "plugin", "onnx"]),
              help="plugin: one AlibiAttention node per block (with its ONNX function body); onnx: the standard "
                   "Attention operator (opset 23), causal with no mask, ALiBi folded into 8 extra head dims: "
                   "fused kernels in ONNX Runtime CUDA and TensorRT (fp16 there; fp32 anywhere).")
@click.option("--seq-len", type=click.IntRange(min=1), help="Fixed-length export: sequence length (default: training length).")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1), help="Fixed-length export: batch.")
@click.option("--kv-cache", is_flag=True, help="Decoder with attention_mask and past/present tensors, for "
                                               "`alibi-export generate` (for ONNX Runtime CUDA add --attention "
                                               "onnx --ort-fusions --dtype float16).")
@click.option("--static-cache", type=click.IntRange(min=1), metavar="LMAX",
              help="With --kv-cache: the cache is a preallocated buffer of up to LMAX tokens (prompt + generation) "
                   "that the graph updates in place (ONNX Runtime's GroupQueryAttention), instead of a copy per "
                   "step: faster decoding on long contexts; float32, ONNX Runtime only.")
@click.option("--logits-to-keep", is_flag=True,
              help="With --kv-cache: the graph takes an int64 input logits_to_keep (0: every position's logits, "
                   "N: the last N's), so a prefill computes only the position it samples from (generate and "
                   "serve pass 1). Every caller must feed it.")
@click.option("--ort-fusions", is_flag=True, help="With --attention onnx: fuse LayerNorm, residual and bias "
                                                   "tails into ONNX Runtime's SkipLayerNormalization and BiasGelu "
                                                   "(faster in ONNX Runtime CUDA; the file then runs in ONNX "
                                                   "Runtime only).")
@click.option("--quantize", type=click.Choice(["int8", "int4"]),
              help="int8 or int4 block-wise weights (ONNX Runtime's MatMulNBits), for the CPU forms; checked by "
                   "perplexity against the float32 model.")
@click.option("--block-size", default=32, show_default=True, type=click.IntRange(1, 1 << 16),
              help="Quantization block size (a power of two >= 16).")
@click.option("--ppl-tolerance", type=float, callback=_positive_finite,
              help="Largest perplexity ratio of a quantized export over float32 (default: int8 1.02, int4 1.08).")
@click.option("--genai", is_flag=True, help="Write an onnxruntime-genai folder (model.onnx, genai_config.json, "
                                            "tokenizer files); needs --kv-cache.")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Check parity (or, quantized, perplexity) against PyTorch before the file takes the -o name.")
@click.option("--lengths", callback=_lengths, help=LENGTHS_HELP + "; a fixed-length export: its own length).")
@click.option("--text", type=click.Path(), default=None, help="Text for perplexity (default: the shipped excerpt).")
@click.option("--seed", type=SEED, help="Seed for the validation's random token ids (default: fresh).")
@click.pass_context
@_one_line_errors
def onnx(ctx, model, out, target, opset, seq_len, batch, ppl_tolerance, validate, lengths, text, seed, **options):
    """Export MODEL (default: the shipped alibi-small) to ONNX, then prove parity and perplexity across lengths.

    The new file takes the -o name only once it has passed that check: a failed export or check leaves a previous
    file of that name as it was."""
    import time

    from ._io import check_replaceable, check_writable_dir
    from .export.onnx_file import written_by_alibi_export
    from .export.targets import resolve_target
    from .perplexity import config_of
    from .sizes import check_evaluation_fits, resolve_lengths

    if target:
        explicit = {k for k in options if ctx.get_parameter_source(k) is click.core.ParameterSource.COMMANDLINE}
        options, chosen = resolve_target(target, options, explicit)
        click.echo(chosen)
    if ppl_tolerance is not None and not options["quantize"]:
        raise click.ClickException("--ppl-tolerance applies to quantized exports. Note: add --quantize int8|int4")
    if options["kv_cache"] and not options["dynamic_len"]:
        raise click.ClickException("a KV-cache export needs a dynamic length. Note: drop --fixed-len")
    model = _default_model(model)
    genai = options.pop("genai", False)
    if genai and options["static_cache"]:
        raise click.ClickException("--genai writes the concatenating KV cache. Note: drop --static-cache")
    if genai and options["logits_to_keep"]:
        raise click.ClickException("onnxruntime-genai feeds no logits_to_keep input. Note: drop --logits-to-keep")
    out = Path(out or (f"{model.name}-genai" if genai else f"{model.name}.onnx"))
    check_writable_dir(out.parent)
    if not genai:  # a genai folder is checked by export_genai, which owns that format
        check_replaceable(out, written_by_alibi_export, "ONNX file")
    # Every option is checked before any work: nothing is traced, written or replaced for a bad one.
    if not model.is_dir():
        from .checkpoint import load

        load(model)  # refuses it in one line: not a checkpoint folder
    cfg = config_of(model)
    seq_len = seq_len or cfg.train_len
    shape = None if options["dynamic_len"] else (batch, seq_len)
    lengths = resolve_lengths(lengths, cfg.train_len, fixed=shape[1] if shape else None)
    check_evaluation_fits(cfg, lengths, 1 if shape is None else batch,
                          "this export's check" if validate else "a fixed-length export")
    if text is None and validate and default_text().is_file():
        text = default_text()
    _read_text_option(text)
    from .checkpoint import load  # torch: after the checks above, so that they answer at once
    from .export.genai import export_genai
    from .export.onnx import export_onnx

    ckpt = load(model)
    t0 = time.perf_counter()
    check = _export_check(out, ckpt, lengths, text, seed, ppl_tolerance, shape) if validate else None
    kwargs = dict(opset=opset, batch=batch, seq_len=seq_len, check=check, **options)
    result = export_genai(ckpt, out, **kwargs) if genai else export_onnx(ckpt, out, **kwargs)
    click.echo(_export_line(model, out, result, options, seq_len, batch, time.perf_counter() - t0))
    if not options["dynamic_len"]:
        click.echo("note: this is a FIXED-LENGTH export; drop --fixed-len for one file that runs at any length")


def _export_check(out, ckpt, lengths, text, seed, ppl_tolerance, shape):
    """The check an export must pass before it takes the ``out`` name (called on the staged file)."""

    def check(staged):
        from .artifacts import read_metadata
        from .runtime import artifact_file

        meta = read_metadata(artifact_file(staged))
        if (meta.attention, meta.dtype) == ("onnx", "float16") and not _has_cuda():
            click.echo(f"note: not validated here: an fp16 file of the onnx form runs on CUDA or TensorRT only. "
                       f"Note: on a GPU run `alibi-export validate {out} --provider cuda`")
            return
        provider = "cuda" if (meta.attention, meta.dtype) == ("onnx", "float16") else "cpu"
        kept = "is unchanged" if out.exists() else "was not written"
        _run_check(staged, ckpt, lengths, text, seed=seed, provider=provider, ppl_tolerance=ppl_tolerance,
                   batch=shape[0] if shape else None, failed=f"{out} {kept}; the failed export was deleted")

    return check


def _run_check(path, ckpt, lengths, text, *, seed=None, provider="cpu", ppl_tolerance=None, batch=None,
               reference=None, failed=""):
    """check_export on ``path``, its table printed; a failure raises one line ending with ``failed``."""
    from .artifacts import read_metadata
    from .data import encode_text, read_text
    from .errors import ParityError
    from .runtime import artifact_file
    from .validate import KV_STEPS, check_export

    meta = read_metadata(artifact_file(path))
    tokens = None
    if text is not None:  # four windows at the longest length keep the check quick; `ppl` evaluates whole texts
        tokens = encode_text(ckpt.tokenizer, read_text(text))[: 4 * max(lengths) + 1]
    if meta.quantization and tokens is None:
        raise click.ClickException("a quantized export is checked by perplexity. Note: pass --text FILE")
    if meta.kv_cache and not meta.quantization:
        click.echo(f"KV-cache parity: prefill L-{KV_STEPS} tokens, decode {KV_STEPS} one at a time, vs one forward of "
                   "the reference")
    result = check_export(path, ckpt.model if reference is None else reference, lengths, tokens=tokens, batch=batch,
                          seed=seed, provider=provider, ppl_tolerance=ppl_tolerance)
    train_len = ckpt.config.train_len
    if result.gate is not None:
        _quantization_gate(result.gate, len(tokens) - 1, text, train_len)
        if click.get_current_context().info_name == "onnx" and result:
            from .validate import record_gate

            record_gate(artifact_file(path), result.gate)  # the staged file, before it takes the -o name
    else:
        if result.perplexity is not None:
            click.echo(f"perplexity on the first {len(tokens) - 1} tokens of {text} (non-overlapping windows)")
        _print_parity(result.parity, *(result.perplexity or (None, None)), train_len)
    if not result:
        what = (f"accuracy gate failed: perplexity ratio beyond {result.gate.tolerance:g}x (--ppl-tolerance "
                "changes it)" if result.gate is not None else
                f"parity check failed: the export's logits differ from the "
                f"{'pytorch' if reference is None else reference.name} reference beyond tolerance")
        raise ParityError(what + (f"; {failed}" if failed else ""))


def _has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _export_line(model, out, result, options, seq_len, batch, seconds) -> str:
    files = [result.path] + ([result.path.with_name(result.path.name + ".data")] if out.is_dir() else [])
    size = sum(f.stat().st_size for f in files if f.is_file()) / 1e6
    shape = "dynamic batch x sequence" if options["dynamic_len"] else f"fixed input shape ({batch}, {seq_len})"
    extras = "".join([", ONNX Runtime fusions" if options["ort_fusions"] else "",
                      f", {options['quantize']} weights" if options["quantize"] else "",
                      ", KV cache" if options["kv_cache"] else "",
                      f" (static, up to {options['static_cache']} tokens)" if options.get("static_cache") else "",
                      ", logits_to_keep input" if options.get("logits_to_keep") else "",
                      ", onnxruntime-genai folder" if out.is_dir() else ""])
    return (f"exported {model} -> {out} ({shape}, opset {result.opset}, {result.dtype}, {result.attention} "
            f"attention{extras}, {size:.1f} MB) in {seconds:.1f}s")


def _quantization_gate(gate, n_tokens, text, train_len):
    """The accuracy gate's table: perplexity of a quantized export vs the float32 PyTorch model, per length.

    ``validate`` also prints the int8 kernel path the file's own gate ran on beside this machine's, and says
    when they differ (an int8 file's arithmetic depends on the path); its verdict is the gate run here."""
    exporting = click.get_current_context().info_name == "onnx"
    recorded = {row[0]: row[1] for row in gate.recorded.get("rows", [])}
    click.echo(f"{gate.quantization} accuracy gate on the first {n_tokens} tokens of {text}: perplexity "
               f"vs float32 PyTorch, tolerance {gate.tolerance:g}x, int8 kernel path {gate.cpu_kernel_path}")
    if not exporting:
        click.echo(f"the file's own gate ran on: {gate.recorded_path or 'not recorded'}; this machine: "
                   f"{gate.cpu_kernel_path}")
        if gate.path_differs:
            click.echo(f"note: KERNEL PATH DIFFERS: the file was gated on {gate.recorded_path}, this machine runs "
                       f"{gate.cpu_kernel_path}; the gate below is this machine's")
    extra = f" {'export':>7}" if recorded and not exporting else ""
    click.echo(f"{'length':>7} {'x train':>7} {'ppl ' + gate.quantization:>9} {'ppl fp32':>9} {'ratio':>7} "
               f"{'argmax':>7}{extra}")
    for r in gate.rows:
        was = f" {recorded[r.length]:>7.4f}" if extra and r.length in recorded else (" " * 8 if extra else "")
        click.echo(f"{r.length:>7} {f'{r.length / train_len:g}x':>7} {r.ppl:>9.3f} {r.ppl_reference:>9.3f} "
                   f"{r.ratio:>7.4f} {r.argmax_agreement:>7.2%}{was}" + ("" if r.ratio <= gate.tolerance else "  FAIL"))
    click.echo(f"accuracy gate {'PASS' if gate else 'FAIL'}" + (f" on {gate.cpu_kernel_path}" if gate.path_differs
                                                                else ""))


@main.command()
@click.argument("export", type=click.Path())
@click.argument("model", required=False, type=click.Path())
@click.option("--model", "model_option", type=click.Path(), hidden=True)  # the earlier spelling of MODEL
@click.option("--lengths", callback=_lengths, help=LENGTHS_HELP + "; a fixed-length export: its own length).")
@click.option("--batch", type=click.IntRange(min=1), help="Rows per input (default: 1; a fixed-length export: its own).")
@click.option("--seed", type=SEED, help="Seed for the random token ids (default: fresh).")
@click.option("--provider", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]),
              help="ONNX Runtime execution provider.")
@click.option("--text", type=click.Path(), help="Also compare perplexity on this text (a quantized file: the text "
                                                "of its gate; default: the shipped excerpt).")
@click.option("--reference", default="pytorch", show_default=True, type=click.Choice(["pytorch", "transformers"]),
              help="pytorch: this project's model of the checkpoint; transformers: transformers' own forward of a "
                   "Hugging Face MODEL folder (needs the [hf] extra).")
@_one_line_errors
def validate(export, model, model_option, lengths, batch, seed, provider, text, reference):
    """Check EXPORT (an .onnx file in ONNX Runtime, an .engine in TensorRT, or an onnxruntime-genai folder)
    against MODEL, its source checkpoint (default: the folder of the recorded name beside EXPORT or among the
    shipped models, if its weights' SHA-256 matches); exit 1 beyond tolerance.

    The check is the one the file calls for: parity of the logits at each length (a KV-cache file through its
    cache), or for a quantized file the perplexity gate."""
    from .artifacts import read_metadata
    from .runtime import artifact_file, fixed_shape, require_gpu
    from .sizes import check_evaluation_fits
    from .validate import lengths_for, source_checkpoint

    if model and model_option:
        raise click.ClickException("MODEL given twice (as an argument and as --model). Note: give it once")
    model = model or model_option
    file = artifact_file(export)
    meta = read_metadata(file)
    lengths = lengths_for(export, lengths, meta.train_len)
    shape = fixed_shape(file)
    if shape is not None and batch not in (None, shape[0]):
        raise click.ClickException(f"{export} is a fixed-length export of batch {shape[0]}. Note: drop --batch")
    check_evaluation_fits(meta.model_config(), lengths, batch or (shape[0] if shape else 1), "validating")
    if meta.quantization and text is None:
        text = default_text()
    _read_text_option(text)
    if file.suffix == ".engine":
        require_gpu(f"validating the TensorRT engine {export}")
    model = Path(model) if model else source_checkpoint(export, [default_model().parent])
    runner = None
    if reference == "transformers":
        if meta.quantization:
            raise click.ClickException("a quantized file is checked by perplexity against this project's model. "
                                       "Note: drop --reference transformers")
        from .runtime.transformers_ref import TransformersRunner

        runner = TransformersRunner(model, max_len=max(lengths))  # refuses a non-HF folder before loading
    from .checkpoint import load  # torch: after the file's checks, so that they answer at once

    ckpt = load(model)
    if ckpt.sha256 != meta.source_sha256:
        click.echo(f"warning: {model} is not the checkpoint {export} was exported from (SHA-256 differs)", err=True)
    _run_check(export, ckpt, lengths, text, seed=seed, provider=provider, batch=batch, reference=runner)


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--text", type=click.Path(), help="UTF-8 text to evaluate on (default: the shipped excerpt).")
@click.option("--lengths", callback=_lengths, help=LENGTHS_HELP + ").")
@click.option("--stride", type=click.IntRange(min=1), help="Sliding window: score only the last STRIDE tokens.")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Evaluate on the first N tokens only.")
@click.option("--provider", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]),
              help="ONNX Runtime execution provider.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results to this JSON file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Also plot perplexity against length into this PNG file.")
@click.option("--kv-window", callback=_window_or_exact, metavar="W|exact",
              help="Score each token as if it saw only its last W tokens (a rolling KV window, see "
                   "docs/kv-window.md); a checkpoint folder or a --kv-cache file. 'exact': the window the "
                   "checkpoint's weights prove changes nothing by more than 2^-32 (see `alibi-export reach`).")
@_one_line_errors
def ppl(models, text, lengths, stride, max_tokens, provider, json_path, plot_path, kv_window):
    """Perplexity per evaluation length for each MODEL: an export (.onnx or genai folder in ONNX Runtime,
    .engine in TensorRT) or a checkpoint folder (PyTorch). Writes no file unless --json or --plot asks."""
    from .perplexity import (check_outputs, common_train_len, config_of, evaluate_model, labels_for,
                             plot_perplexity, write_json)
    from .sizes import check_evaluation_fits, resolve_lengths

    check_outputs(json_path, plot_path)
    text = _read_text_option(text if text is not None else default_text())
    configs = [config_of(m) for m in models]
    resolved = resolve_lengths(lengths, common_train_len(configs, lengths))
    for cfg in configs:
        check_evaluation_fits(cfg, resolved, 1, "evaluating")
    results = {}
    for label, m in zip(labels_for(models), models):
        window = kv_window
        if kv_window == "exact":
            from .reach import reach_of

            reach = reach_of(m, context=max(resolved))
            click.echo(f"{label}: {reach.report()}", err=True)
            window = reach.window if reach.window < max(resolved) else None  # the full cache is the exact one
        results[label] = evaluate_model(m, text, resolved, stride=stride, max_tokens=max_tokens, provider=provider,
                                        kv_window=window)
    width = max(18, *(len(label) for label in results))
    click.echo(f"{'length':>7} " + " ".join(f"{name:>{width}}" for name in results))
    for i, length in enumerate(resolved):
        click.echo(f"{length:>7} " + " ".join(f"{rows[i].ppl:>{width}.2f}" for rows in results.values()))
    written = []
    if json_path is not None:
        write_json(results, json_path, text=str(text), stride=stride,
                   protocol="sliding" if stride else "non-overlapping")
        written.append(json_path)
    if plot_path is not None:
        plot_perplexity(results, plot_path, train_len=configs[0].train_len)
        written.append(plot_path)
    if written:
        click.echo(f"wrote {' and '.join(map(str, written))}")


@main.command()
@click.argument("checkpoint", required=False, type=click.Path())
@click.option("--context", type=click.IntRange(min=1),
              help="The row length the report is for: a head reaching it needs the full cache (default: 64x the "
                   "training length).")
@click.option("--gap", default=32.0, show_default=True, type=click.FloatRange(min=1, max=1000),
              help="The keys beyond a head's reach weigh less than 2^-GAP of its row together.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the report to this JSON file.")
@_one_line_errors
def reach(checkpoint, context, gap, json_path):
    """How far back each ALiBi head can still matter, proved from CHECKPOINT's weights (default: the shipped
    model) for every input: the exact rolling window (--kv-window) and the heads that need the full context
    (docs/kv-window.md)."""
    from .perplexity import check_outputs
    from .reach import reach_of, write_reach_json

    check_outputs(json_path, None, kind="reach")  # before any work
    result = reach_of(_default_model(checkpoint), context=context, gap_bits=gap)
    click.echo(result.report())
    if json_path is not None:
        write_reach_json(result, json_path)
        click.echo(f"wrote {json_path}")


def _batch_range(ctx, param, value):
    try:
        parts = [int(v) for v in str(value).split(":")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or any(n < 1 for n in parts):
        raise click.BadParameter(f"expected MIN:OPT:MAX positive integers (or one N), got {value!r}")
    return tuple(parts)


@main.command()
@click.argument("onnx_file", type=click.Path())
@click.option("-o", "--out", type=click.Path(dir_okay=False), callback=_nonempty_path,
              help="Engine to write (default: ONNX_FILE with .engine).")
@click.option("--min-len", default=1, show_default=True, type=int, help="Shortest sequence of the profile.")
@click.option("--opt-len", default=512, show_default=True, type=int, help="Sequence length TensorRT tunes for.")
@click.option("--max-len", default=8192, show_default=True, type=int, help="Longest sequence of the profile.")
@click.option("--batch", default="1:1:1", show_default=True, callback=_batch_range, help="Batch MIN:OPT:MAX.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Engine precision (default: the ONNX file's dtype); bfloat16 needs full TensorRT and a float32 "
                   "ONNX file.")
@click.option("--fp16", "fp16_alias", is_flag=True, hidden=True)  # the earlier spellings of --dtype
@click.option("--bf16", "bf16_alias", is_flag=True, hidden=True)
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="Timing cache to read and update.")
@click.option("--backend", type=click.Choice(["tensorrt", "tensorrt-rtx"]),
              help="TensorRT family (default: the installed one, full TensorRT first).")
@_one_line_errors
def trt(onnx_file, out, min_len, opt_len, max_len, batch, dtype, fp16_alias, bf16_alias, timing_cache, backend):
    """Build a TensorRT engine from an exported ONNX file, with a JSON sidecar beside it."""
    aliases = [d for d, given in (("float16", fp16_alias), ("bfloat16", bf16_alias)) if given]
    if len(aliases) + (dtype is not None) > 1:
        raise click.ClickException("more than one precision given. Note: pass one --dtype")
    dtype = dtype or (aliases[0] if aliases else None)
    precision = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype)
    from ._io import check_writable_dir
    from .runtime.tensorrt import build_engine

    out = Path(out or Path(onnx_file).with_suffix(".engine"))
    check_writable_dir(out.parent)  # before a build of minutes, not after
    r = build_engine(onnx_file, out, min_len=min_len, opt_len=opt_len, max_len=max_len, batch=batch,
                     precision=precision, timing_cache=timing_cache, backend=backend)
    click.echo(f"parsed network: {sum(r.layer_types.values())} layers: "
               + ", ".join(f"{k} {v}" for k, v in r.layer_types.items()))
    click.echo(f"built {out} ({r.backend} {r.backend_version}, {r.precision}, {r.attention}, lengths "
               f"{min_len}..{opt_len}..{max_len}, batch {':'.join(map(str, batch))}) in {r.build_seconds:.1f}s "
               f"({out.stat().st_size / 1e6:.1f} MB)")
    click.echo(f"sidecar: {r.sidecar_path}")


@main.command()
@click.argument("onnx_file", type=click.Path())
@click.option("-p", "--prompt", "prompts", multiple=True, required=True,
              help="Text to continue; repeat for a batch (left-padded).")
@click.option("-n", "--max-new-tokens", default=64, show_default=True, type=click.IntRange(1, 1 << 20),
              help="Most tokens to add to each prompt.")
@click.option("--temperature", type=float, help="Sample at this temperature (default: greedy decoding).")
@click.option("--top-k", type=int, help="Sample from the K most likely tokens.")
@click.option("--top-p", type=float, help="Sample from the smallest set of tokens whose probability reaches P.")
@click.option("--seed", type=SEED, help="Seed for sampling (default: fresh).")
@click.option("--provider", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]),
              help="ONNX Runtime execution provider.")
@click.option("--threads", type=click.IntRange(1, 4096), help="ONNX Runtime intra-op threads.")
@click.option("--kv-window", type=click.IntRange(min=1),
              help="Keep each row's last W tokens in a rolling KV cache: flat memory and time per token "
                   "(docs/kv-window.md).")
@_one_line_errors
def generate(onnx_file, prompts, max_new_tokens, temperature, top_k, top_p, seed, provider, threads, kv_window):
    """Continue each --prompt with a KV-cache export (`onnx --dynamic-len --kv-cache`) in ONNX Runtime."""
    from .runtime.generate import GenerationSession, check_sampling

    sampling = temperature is not None or top_k is not None or top_p is not None
    options = dict(greedy=not sampling, seed=seed)
    if sampling:
        options.update(temperature=1.0 if temperature is None else temperature, top_k=top_k, top_p=top_p)
        check_sampling(options["temperature"], top_k, top_p)  # before the model loads
    session = GenerationSession(onnx_file, provider=provider, threads=threads, kv_window=kv_window)
    rows = session.encode(list(prompts))  # errors (empty prompt) before anything is printed
    if len(prompts) == 1:  # one prompt streams as it is generated; the prompt once its options are accepted
        unprinted = [prompts[0]]

        def on_token(row, token, text):
            click.echo("".join(unprinted) + text, nl=False)
            unprinted.clear()

        result = session.generate_ids(rows, max_new_tokens, on_token=on_token, **options)
        click.echo("".join(unprinted))
    else:
        result = session.generate_ids(rows, max_new_tokens, **options)
        for i, (prompt, text) in enumerate(zip(prompts, result.texts)):
            click.echo(f"[{i}] {prompt}{text}")
    click.echo(f"{result.new_tokens} new tokens for {len(prompts)} prompt(s) in "
               f"{result.prefill_seconds + result.decode_seconds:.2f}s: {result.tokens_per_s:.1f} tokens/s "
               f"(prefill {1e3 * result.prefill_seconds:.1f} ms, decode {result.decode_ms_per_step:.2f} ms/step, "
               f"{provider})", err=True)


@main.command()
@click.argument("path", required=False, type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every "
                                                                     "interface; put a proxy with TLS in front).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("--provider", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]),
              help="ONNX Runtime execution provider.")
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--spin", is_flag=True,
              help="Let ONNX Runtime's intra-op threads spin-wait between operators. Off by default: spinning "
                   "threads hold the cores that the HTTP thread needs to stream each token (on 2 cores the "
                   "no-batching server's inter-token p99 was 2.6-3.6x higher with them).")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(min=1),
              help="Requests decoded together in one step (1: one request at a time).")
@click.option("--max-tokens-in-flight", default=32768, show_default=True, type=click.IntRange(min=1),
              help="KV-cache budget in tokens (batch rows x the longest prompt + max_tokens among them); a "
                   "request waits until it fits, one that can never fit is refused. A --static-cache export "
                   "allocates it up front: --max-batch slots of min(LMAX, budget / max-batch) columns.")
@click.option("--max-context", default=2048, show_default=True, type=click.IntRange(min=2),
              help="Longest prompt + max_tokens of one request.")
@click.option("--queue", "max_queue", default=64, show_default=True, type=click.IntRange(min=1),
              help="Requests waiting for a batch slot; more are answered 429 with Retry-After.")
@click.option("--prefill-chunk", type=click.IntRange(min=1),
              help="Prompt tokens per prefill pass: a long prompt stalls running streams one chunk at a time. "
                   "[default: 64 on cpu, 256 on cuda] Smaller: steadier streams, later first tokens.")
@click.option("--prefill-in-decode", is_flag=True,
              help="Prompts go through the decode steps, one token a step beside the running requests, instead of "
                   "prefill passes between steps: a stream's gap is one step whatever arrives, a prompt of n tokens "
                   "takes n steps to its first token. --static-cache exports only.")
@click.option("--waiting-served-ratio", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="While requests run, a prefill pass (a stall in every running stream) starts only when it admits "
                   "at least R x the running requests: fewer, larger passes, a steadier inter-token latency, later "
                   "first tokens. 0: whenever a request fits. Raise --prefill-chunk so that a group fits one pass.")
@click.option("--max-waiting-steps", type=click.IntRange(min=1),
              help="With --waiting-served-ratio: a pass that admits fewer starts anyway N decode steps after the "
                   "previous one, so a waiting request is not held back for as long as the running ones last.")
@click.option("--kv-window", type=click.IntRange(min=1),
              help="Each request keeps its last W tokens' keys and values (a rolling window; docs/kv-window.md): its "
                   "cache holds at most W + 64 columns however long it runs. Raise --max-context for long streams.")
@click.option("--grace", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds that requests in flight get to finish after SIGTERM.")
@click.option("--ray", "use_ray", is_flag=True, help="Deploy on Ray Serve (extra [ray]) instead of one process.")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1),
              help="With --ray: replicas of the server, each with its own engine.")
@_one_line_errors
def serve(path, host, port, provider, threads, spin, max_batch, max_tokens_in_flight, max_context, max_queue,
          prefill_chunk, prefill_in_decode, waiting_served_ratio, max_waiting_steps, kv_window, grace, use_ray,
          replicas):
    """Serve PATH (a --kv-cache export, with or without --static-cache, or a --genai folder; default: the shipped model) with an
    OpenAI-compatible API and continuous batching: /v1/completions, /v1/models, /health, /metrics."""
    from .serve.engine import EngineConfig

    config = EngineConfig(max_batch=max_batch, max_tokens_in_flight=max_tokens_in_flight, max_queue=max_queue,
                          prefill_chunk=prefill_chunk, max_context=max_context, kv_window=kv_window,
                          prefill_in_decode=prefill_in_decode, waiting_served_ratio=waiting_served_ratio,
                          max_waiting_steps=max_waiting_steps)
    if use_ray:
        from .serve.ray_app import serve_on_ray

        serve_on_ray(path, config, provider=provider, threads=threads, host=host, port=port, replicas=replicas,
                     spin=spin)
        return
    if replicas != 1:
        raise click.ClickException("--replicas applies to --ray. Note: one process serves one replica")
    from .serve.server import build, serve as run_server

    served = build(path, config, provider=provider, threads=threads, spin=spin)
    click.echo(f"serving {served.model_id} on http://{host}:{port}/v1 ({provider}, max batch {max_batch})", err=True)
    run_server(served, host=host, port=port, grace_seconds=grace)


if __name__ == "__main__":
    main()
