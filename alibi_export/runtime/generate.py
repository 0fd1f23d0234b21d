"""Text generation over a KV-cache export in ONNX Runtime: one session owns the tokenizer and the cache.

Every step runs through ONNX Runtime's IO binding. The ``present`` outputs are bound to the session's
device and handed back as the next step's ``past_key_values`` inputs as they are (``OrtValue``s), so
on CUDAExecutionProvider the cache never leaves the GPU; only the token ids and the mask go up and
the logits come down. On CPU the same code runs with device "cpu", so the CPU tests exercise it.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AlibiExportError
from .kv_buffer import StaticCache

__all__ = ["GenerationSession", "GenerationResult", "EOS_TOKEN", "check_sampling", "Sampler", "TokenStream", "left_pad"]

EOS_TOKEN = "<|endoftext|>"
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class GenerationResult:
    texts: list[str]  # the continuation of each prompt (stop token excluded)
    token_ids: list[list[int]]  # the new token ids of each prompt (stop token excluded)
    prompt_lengths: list[int]
    prefill_seconds: float
    decode_seconds: float
    steps: int  # forward passes after the prefill

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        """New tokens of all prompts per second of prefill and decoding together."""
        return self.new_tokens / max(self.prefill_seconds + self.decode_seconds, 1e-9)

    @property
    def decode_ms_per_step(self) -> float:
        return 1e3 * self.decode_seconds / max(self.steps, 1)


class GenerationSession:
    """An ONNX Runtime session over a KV-cache export (``alibi-export onnx --dynamic-len --kv-cache``).

    ``path``: the ``.onnx`` file; ``provider``: "cpu" or "cuda". The tokenizer comes from the file's
    metadata. ``generate`` takes text, ``generate_ids`` token ids; ``step`` is one forward pass.

    ``kv_window``: each row keeps its last W tokens' keys and values only (a rolling window, see
    :mod:`.window`), so memory and time per token stay flat however long the stream; ``window_slack``
    columns more may be held, so that the cache is cut once every ``window_slack`` steps.
    """

    def __init__(self, path: str | Path, *, provider: str = "cpu", threads: int | None = None, device_id: int = 0,
                 kv_window: int | None = None, window_slack: int = 0, spin: bool = True):
        from ..artifacts import model_config_of, read_metadata, tokenizer_of
        from .onnxruntime import create_session

        self.path = Path(path)
        meta = read_metadata(self.path)
        if provider == "cuda" and meta.static_cache and meta.attention != "onnx":
            # Measured on an H200 with onnxruntime-gpu 1.31.1: the first prefill of this form stops inside ONNX
            # Runtime (a Where whose condition has lost its batch dimension, next to the GroupQueryAttention node
            # that its CUDA provider cannot take: float32, or an attention bias). The folded form runs there.
            raise AlibiExportError(f"{str(self.path)!r} is the default --static-cache form, which does not run on "
                                   "ONNX Runtime's CUDA provider. Note: for CUDA, export it with --static-cache "
                                   "--attention onnx --dtype float16 (or serve the --kv-cache export)")
        self.session = create_session(self.path, provider=provider, threads=threads, spin=spin)
        self.device, self.device_id = ("cuda" if provider == "cuda" else "cpu"), device_id
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._past_names = [n for n in inputs if n.startswith("past_key_values.")]
        if "attention_mask" not in inputs or not self._past_names:
            raise AlibiExportError(f"{str(self.path)!r} has no KV-cache inputs (attention_mask, past_key_values.*). "
                                   "Note: export it with `alibi-export onnx MODEL --dynamic-len --kv-cache`")
        self._present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        # --logits-to-keep (export.kv_cache.keep_last_logits): a prefill computes its last position's logits only
        self.keeps_logits = "logits_to_keep" in inputs
        self.config = model_config_of(self.path)
        self.tokenizer = tokenizer_of(self.path)
        self.cache_dtype = _DTYPES[inputs[self._past_names[0]].type]
        self.cache_width = inputs[self._past_names[0]].shape[-1]  # head_dim, or head_dim + 8 (onnx form)
        static = meta.static_cache  # the static-cache form: buffers updated in place
        self.static = StaticCache(static, self.config.kv_heads, self.cache_width, self.cache_dtype, self.device,
                                  device_id) if static else None
        self.kv_window, self.window_slack = None, window_slack
        self._ops = None
        if kv_window is not None:
            from .window import check_window, check_window_form

            if self.static is not None:  # a rolling window cuts cache columns; a static buffer keeps them in place
                raise AlibiExportError(f"--kv-window does not apply to {str(self.path)!r}, a --static-cache export. "
                                       "Note: use the same model exported with --kv-cache alone")
            check_window_form(self.config, self.cache_width, repr(str(self.path)))
            self.kv_window = check_window(kv_window)

    @property
    def n_past(self) -> int:
        """How many past_key_values.* tensors a step takes (keys and values of every layer)."""
        return len(self._past_names)

    # ------------------------------------------------------------------ one forward pass
    def new_cache(self, batch: int, length: int = 0) -> list:
        """Zero-length past tensors (batch, heads, 0, width) on the session's device: the prefill's cache.
        A static-cache file gets buffers of ``length`` columns instead, the longest prompt + generation."""
        from onnxruntime import OrtValue

        if self.static is not None:
            return self.static.allocate(batch, length, len(self._past_names))
        empty = np.zeros((batch, self.config.kv_heads, 0, self.cache_width), dtype=self.cache_dtype)
        return [OrtValue.ortvalue_from_numpy(empty, self.device, self.device_id) for _ in self._past_names]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, cache: list, *,
             logits_on_device: bool = False, last_only: bool = False) -> tuple[np.ndarray, list]:
        """Logits (B, L, V) as float32 on the host, and the new cache (``OrtValue``s left on the device).

        ``attention_mask`` is (B, past + L); ``cache`` is what ``new_cache`` or the previous step returned.
        ``logits_on_device``: the logits as an ``OrtValue`` left on the device in the model's dtype (the
        server takes the last position's from it, not all L positions' through the host). ``last_only``: the
        caller reads the last position's logits only; a ``--logits-to-keep`` file then computes only those,
        (B, 1, V), and any other file all L as before."""
        if self.static is not None:
            self.static.check_step(*input_ids.shape, attention_mask.shape[1], cache)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        if self.keeps_logits:
            binding.bind_cpu_input("logits_to_keep", np.array(1 if last_only else 0, dtype=np.int64))
        if self.static is not None:
            self.static.bind_pasts(binding, self._past_names, cache)  # OrtValues, or views of the server's slots
        else:
            for name, value in zip(self._past_names, cache):
                binding.bind_ortvalue_input(name, value)
        if logits_on_device:
            binding.bind_output("logits", self.device, self.device_id)
        else:
            binding.bind_output("logits", "cpu")  # sampling runs on the host
        if self.static is not None:
            self.static.bind_presents(binding, self._present_names, cache)  # updated in place
        else:
            for name in self._present_names:
                binding.bind_output(name, self.device, self.device_id)  # stays where the model runs
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # in the order bound: logits, then the presents
        # A static cache's outputs are views of the buffers it was given: hand back those (they own the memory).
        presents = self.static.updated(cache, outputs[1:]) if self.static is not None else list(outputs[1:])
        logits = outputs[0] if logits_on_device else outputs[0].numpy().astype(np.float32, copy=False)
        return logits, presents

    def step_pieces(self, input_ids: np.ndarray, pieces: Sequence[int]) -> tuple[np.ndarray, list]:
        """Feed ``input_ids`` (no padding) through the cache in pieces of the given lengths, from an
        empty cache: the concatenated logits (B, L, V) and the final cache. Parity checks use it."""
        if sum(pieces) != input_ids.shape[1]:
            raise ValueError(f"pieces {list(pieces)} do not add up to {input_ids.shape[1]} tokens")
        cache, start, out = self.new_cache(*input_ids.shape), 0, []
        mask = np.ones((input_ids.shape[0], 0), dtype=np.int64)
        for n in pieces:
            cache, mask = self.window(cache, mask, n)
            mask = np.concatenate([mask, np.ones((input_ids.shape[0], n), dtype=np.int64)], axis=1)
            logits, cache = self.step(input_ids[:, start:start + n], mask, cache)
            out.append(logits)
            start += n
        return np.concatenate(out, axis=1), cache

    # ------------------------------------------------------------------ generation
    def encode(self, prompts: str | Sequence[str]) -> list[list[int]]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise AlibiExportError("no prompt given. Note: expected at least one non-empty prompt")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise AlibiExportError(f"prompt {i} is not a string. Note: got {type(p).__name__}")
            try:
                p.encode("utf-8")  # a command line's undecodable bytes arrive as lone surrogates
            except UnicodeEncodeError:
                raise AlibiExportError(f"prompt {i} is not valid UTF-8 text. Note: pass the prompt as UTF-8") from None
        ids = [self.tokenizer.encode(p).ids for p in prompts]
        for i, row in enumerate(ids):
            if not row:
                raise AlibiExportError(f"prompt {i} is empty. Note: expected text that encodes to at least one token")
        return ids

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 32, **options) -> GenerationResult:
        """Continue each prompt; batched prompts are left-padded. Options as :meth:`generate_ids`."""
        return self.generate_ids(self.encode(prompts), max_new_tokens, **options)

    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 32, *, greedy: bool = True,
                     temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                     stop_tokens: Iterable[int | str] | None = None, seed: int | None = None,
                     on_token: Callable[[int, int, str], None] | None = None) -> GenerationResult:
        """Continue each row of ``prompt_ids`` by up to ``max_new_tokens`` tokens.

        ``greedy`` takes the argmax; ``greedy=False`` samples at ``temperature`` from the ``top_k`` most
        likely tokens and the smallest set whose probability reaches ``top_p``, with a generator seeded by
        ``seed`` (same seed, same text). A row stops at any of ``stop_tokens`` (ids or token strings;
        default: the config's eos_token_id, else the end-of-text token where the vocabulary has one).
        ``on_token(row, token_id, text)`` is called for each new token with the text it adds (empty while
        a multi-byte character is incomplete).
        """
        rows = self.check_ids(prompt_ids)
        sampler = Sampler(greedy, temperature, top_k, top_p, seed)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise AlibiExportError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        stops = self.stop_ids(stop_tokens)
        ids, mask = left_pad(rows)  # (B, L) each
        if self.static is not None:
            self.static.check(ids.shape[1] + max_new_tokens)
        streams = [TokenStream(self.tokenizer, i, on_token) for i in range(len(rows))]
        t0 = time.perf_counter()
        logits, cache, mask = self.prefill(ids, mask, ids.shape[1] + max_new_tokens)
        prefill, steps = time.perf_counter() - t0, 0
        t0 = time.perf_counter()
        while True:
            next_ids = sampler(logits[:, -1])  # (B,)
            for stream, token in zip(streams, next_ids):
                stream.push(int(token), stops)
            if all(s.done or len(s.ids) >= max_new_tokens for s in streams):
                break
            cache, mask = self.window(cache, mask, 1)
            mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)  # (B, past + 1)
            logits, cache = self.step(next_ids[:, None], mask, cache)
            steps += 1
        decode = time.perf_counter() - t0
        return GenerationResult([s.text() for s in streams], [s.ids for s in streams], [len(r) for r in rows],
                                prefill, decode, steps)

    def window(self, cache: list, mask: np.ndarray, incoming: int) -> tuple[list, np.ndarray]:
        """The cache and mask for a step of ``incoming`` tokens: cut to the rolling window (``kv_window``), or as
        they are without one."""
        if self.kv_window is None:
            return cache, mask
        from .window import trim_window

        return trim_window(cache, mask, self.kv_window, incoming=incoming, slack=self.window_slack,
                           device=self.device, device_id=self.device_id, cut=self._device_ops().cut)

    def _device_ops(self):
        """The cache's operations on the session's device (made once; runtime.device_ops)."""
        if self._ops is None:
            from .device_ops import DeviceOps

            self._ops = DeviceOps(self, self.n_past)
        return self._ops

    def prefill(self, ids: np.ndarray, mask: np.ndarray, total: int = 0) -> tuple[np.ndarray, list, np.ndarray]:
        """Logits (the last position's at least), cache and mask after the left-padded prompts ``ids``: one pass,
        or with a window shorter than the prompts one pass over its first ``kv_window`` columns and one step per
        column after, so that every prompt token also sees its last ``kv_window`` tokens only (exact, and slower
        for such long prompts).
        ``total``: the prompt and generation's length, the columns a static-cache file's buffers get."""
        first = ids.shape[1] if self.kv_window is None else min(ids.shape[1], self.kv_window)
        cache = self.new_cache(len(ids), max(total, ids.shape[1]))
        logits, cache = self.step(ids[:, :first], mask[:, :first], cache, last_only=True)
        seen = mask[:, :first]
        for c in range(first, ids.shape[1]):
            cache, seen = self.window(cache, seen, 1)
            seen = np.concatenate([seen, mask[:, c:c + 1]], axis=1)
            logits, cache = self.step(ids[:, c:c + 1], seen, cache, last_only=True)
        return logits, cache, seen

    def check_ids(self, prompt_ids) -> list[list[int]]:
        """Each prompt as a list of ints, refused when empty or outside the vocabulary (the server uses it too)."""
        rows = [list(map(int, np.asarray(r, dtype=np.int64).ravel())) for r in prompt_ids]
        if not rows or any(not r for r in rows):
            raise AlibiExportError("empty prompt. Note: expected at least one token id in every prompt")
        vocab = self.config.vocab_size
        bad = [t for r in rows for t in r if not 0 <= t < vocab]
        if bad:
            raise AlibiExportError(f"token id {bad[0]} is outside the vocabulary. Note: expected ids in [0, {vocab})")
        return rows

    def stop_ids(self, stop_tokens) -> set[int]:
        """The token ids that end a row: ``stop_tokens`` (ids or token strings), or the model's end of text."""
        if stop_tokens is None:
            if self.config.eos_token_id is not None:  # a Hugging Face model's config names its own
                return {self.config.eos_token_id}
            eos = self.tokenizer.token_to_id(EOS_TOKEN)
            return set() if eos is None else {eos}
        ids = set()
        for t in stop_tokens:
            tid = self.tokenizer.token_to_id(t) if isinstance(t, str) else int(t)
            if tid is None:
                raise AlibiExportError(f"stop token {t!r} is not in the vocabulary")
            ids.add(tid)
        return ids


def left_pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ids (B, L) with padding (id 0) on the left, and the 1/0 attention mask."""
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return ids, mask


def check_sampling(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """Refuse sampling parameters out of range: temperature > 0 and finite, top_k >= 1, top_p in (0, 1]."""
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise AlibiExportError(f"temperature must be a positive finite number, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise AlibiExportError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise AlibiExportError(f"top_p must be in (0, 1], got {top_p}")


class Sampler:
    """Greedy or top-k/top-p sampling with its own generator: one per request in the server, so a seeded
    request draws the same numbers whatever else is in the batch."""

    def __init__(self, greedy: bool, temperature: float, top_k: int | None, top_p: float | None, seed: int | None):
        if greedy and (temperature != 1.0 or top_k is not None or top_p is not None):
            raise AlibiExportError("temperature, top_k and top_p apply to sampling. Note: pass greedy=False")
        check_sampling(temperature, top_k, top_p)
        self.greedy, self.temperature, self.top_k, self.top_p = greedy, temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """(B, V) logits -> (B,) token ids."""
        if self.greedy:
            return logits.argmax(-1)
        x = logits.astype(np.float64) / self.temperature
        order = np.argsort(-x, axis=-1, kind="stable")  # most likely first
        x = np.take_along_axis(x, order, axis=-1)
        if self.top_k is not None:
            x[:, self.top_k:] = -np.inf
        probs = np.exp(x - x[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        if self.top_p is not None:
            before = np.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
            probs = np.where(before < self.top_p, probs, 0.0)
            probs /= probs.sum(-1, keepdims=True)
        cdf = np.cumsum(probs, axis=-1)
        u = self.rng.random((len(x), 1)) * cdf[:, -1:]
        picked = np.minimum((cdf <= u).sum(-1), x.shape[1] - 1)  # (B,) rank of the chosen token
        return np.take_along_axis(order, picked[:, None], axis=-1)[:, 0]


class TokenStream:
    """One prompt's new tokens, and its text as it grows (for the streaming callback).

    The callback gets only the new text, from the tokenizers library's incremental decoder: it holds back a
    byte-level token that ends inside a UTF-8 character, and it costs the same at the 10,000th token as at the
    first (decoding the whole row at each token cost the server tens of microseconds per token and growing)."""

    def __init__(self, tokenizer, row: int, on_token):
        self.tokenizer, self.row, self.on_token = tokenizer, row, on_token
        self.ids: list[int] = []
        self.done = False
        self._decoder = None

    def push(self, token: int, stops: set[int]):
        if self.done:
            return
        if token in stops:
            self.done = True
            return
        self.ids.append(token)
        if self.on_token is not None:
            if self._decoder is None:
                from tokenizers.decoders import DecodeStream

                self._decoder = DecodeStream(skip_special_tokens=True)
            self.on_token(self.row, token, self._decoder.step(self.tokenizer, token) or "")

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


# The names these pieces had before the server shared them (tests and other modules import them).
_Sampler, _Stream, _left_pad = Sampler, TokenStream, left_pad
GenerationSession._stop_ids = GenerationSession.stop_ids
