"""The Python face of a C-owned model: Model, its parameter tree, forward outputs and traces."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from ._checks import (check_bool, check_int, check_optional_int, check_pair, check_path,
                      check_real, check_seed)
from .config import Config

PICKLE_FORMAT = "stackformer-pickle/1"
_UTF8_REPLACEMENT = "\ufffd".encode("utf-8")

_TRACE_FLAGS = {
    "attention": _core.TRACE_ATTENTION,
    "hidden": _core.TRACE_HIDDEN,
    "sublayer_outputs": _core.TRACE_SUBLAYER,
    "alpha": _core.TRACE_ALPHA,
    "depth_mass": _core.TRACE_DEPTH,
    "rms": _core.TRACE_RMS,
    "activations": _core.TRACE_ACTIVATIONS,
}


@dataclass
class TraceOptions:
    """What a traced forward pass records. Everything but `activations` is on by default;
    `layers` limits the per-layer recordings to those block indices (index n_layers = the
    output end: final hidden state and the output aggregator), so deep models need not keep
    every (B,H,T,T) map. `activations` (off by default, on in `Model.run_with_cache`) adds the
    embedding output, each MLP's input, q/k/v before RoPE, attention's per-head output z and
    the MLP activation: about 9 more (B, T, d) arrays per block."""

    attention: bool = True
    hidden: bool = True
    sublayer_outputs: bool = True
    alpha: bool = True
    depth_mass: bool = True
    rms: bool = True
    activations: bool = False
    layers: Optional[Sequence[int]] = None

    def flags(self) -> int:
        for k in _TRACE_FLAGS:
            check_bool(f"TraceOptions.{k}", getattr(self, k))
        return sum(f for k, f in _TRACE_FLAGS.items() if getattr(self, k))

    def layer_list(self) -> Optional[List[int]]:
        """`layers` as a list of ints (None = every layer); TypeError naming it otherwise."""
        if self.layers is None:
            return None
        if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Iterable):
            raise TypeError(f"TraceOptions.layers must be None or a sequence of block indices, "
                            f"got {type(self.layers).__name__}")
        return [check_int("TraceOptions.layers[]", i) for i in self.layers]


def _trace_options(trace: Any) -> Optional[TraceOptions]:
    if trace is None or trace is False:
        return None
    if trace is True:
        return TraceOptions()
    if isinstance(trace, TraceOptions):
        return trace
    if isinstance(trace, str):
        trace = [trace]
    if isinstance(trace, Iterable) and not isinstance(trace, Mapping):
        kinds = list(trace)
        bad = [k for k in kinds if not isinstance(k, str) or k not in _TRACE_FLAGS]
        if bad:
            raise ValueError(f"unknown trace kind(s) {bad}; choose from {sorted(_TRACE_FLAGS)}")
        return TraceOptions(**{k: (k in kinds) for k in _TRACE_FLAGS})
    raise TypeError(f"trace must be a bool, a TraceOptions or a list of kinds, got {type(trace).__name__}")


@dataclass
class Trace:
    """Recordings of one forward pass (n = n_layers blocks, L = 2n sublayers).

    attention[i]:  (B, H, T, T + depth_cols[i]) attention probabilities of block i; with MoDA
                   columns [0, T) are sequence keys and [T, ...) depth slots (`seq_len` marks
                   the boundary), depth column (u - chunk_start)*2i + slot.
    hidden[i]:     (B, T, d) what block i reads (plain: the residual stream; AttnRes: the
                   aggregate h_{2i}); hidden[n] = the final stream/aggregate before final_norm.
    attn_out[i], mlp_out[i]: (B, T, d) each sublayer's output (plain: the update it adds).
    alpha[k]:      (B, T, n_sources(k)) the depth-mixing weights sublayer k reads with (k = L:
                   the output read), with `alpha_labels[k]` naming the sources (attnres_heads
                   H > 1: (B, T, H, n_sources(k)), one softmax per head). AttnRes: the
                   depth softmax over v0..vk (or blocks); DenseFormer: the DWA weights over
                   x0..xi (before attention sublayers and the head; None before MLPs);
                   Hyper-Connections/mHC: the read weights over the copies h1..hn. Plain: None.
    depth_mass[i]: MoDA only: (B, H, T) attention mass on depth slots.
    rms:           (L+1, 3) per sublayer: RMS of its input, of its output, of the plain running
                   sum after it (row L: final stream; other columns NaN).
    copy_rms:      Hyper-Connections/mHC only: (L+1, n) RMS of each copy of the stream entering
                   sublayer k (row L: the copies the head sums), recorded with rms.
    With activations=True (TraceOptions; see Model.run_with_cache for the named view):
    embed:         (B, T, d) the embedding output (token + learned/sinusoidal position).
    hidden_mid[i]: (B, T, d) what block i's MLP sublayer reads (before its pre-norm).
    q[i], z[i]:    (B, T, H, dh) query projection (before RoPE) / attention's per-head output
                   before o_proj; k[i], v[i]: (B, T, Hkv, dh) (k before RoPE).
    mlp_post[i]:   (B, T, d_ff) the MLP activation down_proj reads.
    Entries not recorded are None.
    """

    attention: Optional[List[Optional[np.ndarray]]] = None
    hidden: Optional[List[Optional[np.ndarray]]] = None
    attn_out: Optional[List[Optional[np.ndarray]]] = None
    mlp_out: Optional[List[Optional[np.ndarray]]] = None
    alpha: Optional[List[Optional[np.ndarray]]] = None
    alpha_labels: Optional[List[List[str]]] = None
    depth_mass: Optional[List[Optional[np.ndarray]]] = None
    rms: Optional[np.ndarray] = None
    copy_rms: Optional[np.ndarray] = None
    seq_len: int = 0
    embed: Optional[np.ndarray] = None
    hidden_mid: Optional[List[Optional[np.ndarray]]] = None
    q: Optional[List[Optional[np.ndarray]]] = None
    k: Optional[List[Optional[np.ndarray]]] = None
    v: Optional[List[Optional[np.ndarray]]] = None
    z: Optional[List[Optional[np.ndarray]]] = None
    mlp_post: Optional[List[Optional[np.ndarray]]] = None

    @property
    def alpha_matrix(self) -> np.ndarray:
        """(L+1, max_sources) token- and batch-averaged alpha (and head-averaged with
        attnres_heads > 1), NaN where a row does not read a source. Columns are sources in
        order (v0, v1, ... or b0, b1, ...); under attnres_window a row's window lands in the
        columns of the sources it reads, so a column is the same source in every row."""
        if self.alpha is None:
            raise ValueError("no alpha recorded (a model with depth-mixing weights, traced with alpha=True, needed)")
        cols = self._alpha_columns()
        width = max(int(c[-1]) + 1 for c in cols if c is not None and len(c))
        out = np.full((len(self.alpha), width), np.nan, dtype=np.float64)
        for k, a in enumerate(self.alpha):
            if a is not None:
                out[k, cols[k]] = a.mean(axis=tuple(range(a.ndim - 1)))
        return out

    def _alpha_columns(self) -> List[Optional[np.ndarray]]:
        """alpha_matrix's column of each recorded source: its position in the unwindowed list
        (the window keeps source 0 and the last W, whose positions are known from labels)."""
        out: List[Optional[np.ndarray]] = []
        for k, a in enumerate(self.alpha):
            if a is None:
                out.append(None)
                continue
            n = a.shape[-1]
            lab = self.alpha_labels[k] if self.alpha_labels and k < len(self.alpha_labels) else None
            if lab and len(lab) == n and all(x[0] in "vb" and x[1:].split("^")[0].isdigit() for x in lab):
                # v{i} / b{j}: column i / j (the partial sum b{m}^{i} sits in column m)
                out.append(np.array([int(x[1:].split("^")[0]) for x in lab]))
            else:
                out.append(np.arange(n))
        return out

    @property
    def depth_mass_mean(self) -> np.ndarray:
        """(n_layers, H) mean share of attention mass on depth slots (NaN where not recorded)."""
        if self.depth_mass is None:
            raise ValueError("no depth_mass recorded (MoDA model traced with depth_mass=True needed)")
        H = next(a.shape[1] for a in self.depth_mass if a is not None)
        out = np.full((len(self.depth_mass), H), np.nan)
        for i, a in enumerate(self.depth_mass):
            if a is not None:
                out[i] = a.mean(axis=(0, 2))
        return out

    @property
    def rms_table(self) -> Dict[str, np.ndarray]:
        """The rms summary as named columns: input, output, stream (each (L+1,))."""
        if self.rms is None:
            raise ValueError("no rms recorded (trace with rms=True needed)")
        return {"input": self.rms[:, 0], "output": self.rms[:, 1], "stream": self.rms[:, 2]}


@dataclass
class Output:
    """Result of Model.__call__: logits (B, T, V) float32, or hidden_states (B, T, d) after the
    final norm when asked, and the Trace when trace was requested."""

    logits: Optional[np.ndarray] = None
    hidden_states: Optional[np.ndarray] = None
    trace: Optional[Trace] = None


class ParamTree:
    """Attribute access to named parameter views: model.layers[3].attn.q_proj.weight.

    Leaves are float32 NumPy views of the C-owned buffer (writable; writes change the model).
    Assigning an array to a leaf copies into the view after checking its shape."""

    def __init__(self, prefix: str):
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_children", {})

    def __getattr__(self, name: str) -> Any:
        children = object.__getattribute__(self, "_children")
        if name in children:
            return children[name]
        raise AttributeError(f"{self._prefix or 'model'} has no parameter or submodule {name!r}; "
                             f"it has: {', '.join(children)}")

    def __setattr__(self, name: str, value: Any) -> None:
        cur = self._children.get(name)
        if not isinstance(cur, np.ndarray):
            raise AttributeError(f"cannot set {name!r} on {self._prefix or 'model'}: not a parameter")
        _copy_checked(cur, value, f"{self._prefix}.{name}".lstrip("."))

    def __dir__(self) -> List[str]:
        return list(self._children)

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={tuple(v.shape)}" if isinstance(v, np.ndarray) else k
                          for k, v in self._children.items())
        return f"<{self._prefix or 'model'}: {items}>"


def _as_array(x: Any, name: str = "input", byte_level: bool = False) -> Any:
    """bytes -> uint8 ids; str -> its UTF-8 bytes (byte-level models only); list/tuple ->
    array (ragged or non-numeric lists refused by name). Anything else is returned as is for
    the C binding to check."""
    if isinstance(x, str):
        if not byte_level:
            raise TypeError(f"{name}: a str is read as its UTF-8 bytes, which needs a byte-level "
                            f"model (vocab_size >= 256); pass token ids (a numpy array) instead")
        return np.frombuffer(x.encode("utf-8"), dtype=np.uint8)
    if isinstance(x, (bytes, bytearray)):
        return np.frombuffer(bytes(x), dtype=np.uint8)
    if isinstance(x, (list, tuple)):
        try:
            a = np.asarray(x)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{name}: a list must be rectangular (all rows the same length): {e}") from None
        if a.dtype.kind not in "iuf":
            raise TypeError(f"{name}: a list must hold token ids or floats, got dtype {a.dtype}")
        return a
    return x


def _ids_to_text(ids: np.ndarray) -> str:
    """Byte ids -> str (UTF-8, invalid sequences and ids >= 256 become U+FFFD)."""
    ids = np.asarray(ids).astype(np.int64).ravel()
    if ids.size and ids.max() >= 256:
        return b"".join(bytes([int(i)]) if i < 256 else _UTF8_REPLACEMENT for i in ids).decode(
            "utf-8", errors="replace")
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _sample(logits: np.ndarray, temperature: float, top_k: Optional[int], rng) -> np.ndarray:
    """One token id per row of logits (B, V)."""
    logits = logits.astype(np.float64)
    if temperature == 0:
        return logits.argmax(axis=-1).astype(np.int64)
    z = logits / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)


def _copy_checked(dst: np.ndarray, value: Any, name: str) -> None:
    arr = _checked_array(value, dst.shape, name)
    np.copyto(dst, arr, casting="unsafe")


def _checked_array(value: Any, shape: tuple, name: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(value).__name__}")
    if value.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point array, got dtype {value.dtype}")
    if value.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {value.shape}")
    if not np.all(np.isfinite(value)):
        raise ValueError(f"{name}: contains NaN or inf")
    return value


class Model:
    """A stacked self-attention transformer whose weights and math live in C.

    >>> cfg = Config(vocab_size=256, d_model=64, n_heads=4, n_layers=2, max_seq_len=32)
    >>> model = Model(cfg, seed=0)
    >>> out = model(np.array([[1, 2, 3]]), trace=True)
    >>> out.logits.shape, out.trace.attention[0].shape
    ((1, 3, 256), (1, 4, 3, 3))
    """

    def __init__(self, config: Config, seed: int = 0):
        if not isinstance(config, Config):
            raise TypeError(f"config must be a stackformer.Config, got {type(config).__name__}")
        # ValueError for a wrong type too (kept from earlier releases; tests rely on it)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)) \
                or not (0 <= int(seed) < 2**64):
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        config = dataclasses.replace(config)  # own copy, re-validated
        self.config = config
        self._c = _core.CModel(**config._c_kwargs(), seed=int(seed))
        self._flat = self._c.params
        self._flat_grads = self._c.grads
        self._params: Dict[str, np.ndarray] = {}
        self._grads: Dict[str, np.ndarray] = {}
        self._no_decay: Dict[str, bool] = {}
        self._offsets: Dict[str, int] = {}
        self._root = ParamTree("")
        for name, offset, shape, _layer, no_decay in self._c.tensors():
            size = int(np.prod(shape))
            view = self._flat[offset: offset + size].reshape(shape)
            grad = self._flat_grads[offset: offset + size].reshape(shape)
            grad.flags.writeable = False
            self._params[name] = view
            self._grads[name] = grad
            self._no_decay[name] = bool(no_decay)
            self._offsets[name] = int(offset)
            self._insert(name, view)
            self._insert(name + "_grad", grad)
        self.last_grad_norm: Optional[float] = None
        self.checkpoint_extra: Optional[dict] = None
        layers = self._root._children.get("layers")
        self.layers: List[ParamTree] = [layers._children[str(i)] for i in range(config.n_layers)]

    def _insert(self, name: str, view: np.ndarray) -> None:
        node = self._root
        parts = name.split(".")
        for j, part in enumerate(parts[:-1]):
            nxt = node._children.get(part)
            if nxt is None:
                nxt = ParamTree(".".join(parts[: j + 1]))
                node._children[part] = nxt
            node = nxt
        node._children[parts[-1]] = view

    # -- parameters ----------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        root = self.__dict__.get("_root")
        if root is not None and name in root._children:
            return root._children[name]
        raise AttributeError(f"Model has no attribute {name!r}")

    @property
    def num_params(self) -> int:
        return int(self._c.num_params)

    @property
    def flat_params(self) -> np.ndarray:
        """All parameters as one writable float32 view, in table order."""
        return self._flat

    @property
    def grads(self) -> Dict[str, np.ndarray]:
        """name -> read-only float32 view of that parameter's gradient (from the last
        forward_backward / train_step). Also reachable as e.g. layers[0].attn.q_proj.weight_grad."""
        return dict(self._grads)

    @property
    def flat_grads(self) -> np.ndarray:
        return self._flat_grads

    def no_decay(self, name: str) -> bool:
        """True for tensors AdamW never decays (norms, biases, AttnRes pseudo-queries/gains)."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a parameter name (str), got {type(name).__name__}")
        if name not in self._no_decay:
            raise KeyError(f"no parameter named {name!r}")
        return self._no_decay[name]

    def named_parameters(self) -> Dict[str, np.ndarray]:
        """name -> writable float32 view of the C buffer, in buffer order."""
        return dict(self._params)

    def state_dict(self) -> Dict[str, np.ndarray]:
        """name -> float32 copy (PyTorch naming: Linear weights are (out, in)). The copy is one
        consistent state: taken under the model's guard, it waits for a train step running
        in another thread instead of catching it half-way."""
        return self._split(self._c.snapshot(True, False, False)[0])

    def _split(self, flat: np.ndarray) -> Dict[str, np.ndarray]:
        """A flat copy cut into named tensors (views of the copy, not of the model)."""
        out = {}
        for k, v in self._params.items():
            off = self._offsets[k]
            out[k] = flat[off: off + v.size].reshape(v.shape)
        return out

    def load_state_dict(self, state_dict: Dict[str, np.ndarray], strict: bool = True) -> None:
        """Copy tensors in. Every name, shape, dtype and value is checked before anything is
        written, so a bad state_dict leaves the model untouched. strict=False allows missing
        keys (unexpected keys are always an error)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        strict = check_bool("strict", strict)
        unexpected = sorted(k for k in state_dict if k not in self._params)
        if unexpected:
            raise KeyError(f"unexpected key(s) in state_dict: {', '.join(map(str, unexpected[:10]))}")
        missing = [k for k in self._params if k not in state_dict]
        if strict and missing:
            raise KeyError(f"missing key(s) in state_dict: {', '.join(missing[:10])}"
                           + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""))
        checked = {k: _checked_array(v, self._params[k].shape, k) for k, v in state_dict.items()}
        # written as one step under the guard: it waits for running forward calls and train
        # steps, so none of them sees half of the old weights and half of the new
        flat = np.zeros(self.num_params, dtype=np.float32)
        which = bytearray(len(self._params))
        parts = self._split(flat)
        for t, k in enumerate(self._params):
            if k in checked:
                np.copyto(parts[k], checked[k], casting="unsafe")
                which[t] = 1
        self._c.restore(flat, bytes(which), None, None, None)

    def save(self, path: str, optimizer: bool = False, extra: Optional[dict] = None) -> None:
        """Write a safetensors checkpoint (config in the metadata), atomically: a crash
        mid-save leaves the previous file intact. optimizer=True also stores AdamW's moments
        and step; `extra` (JSON-able, e.g. a data RNG state) comes back as
        `Model.load(path).checkpoint_extra`."""
        from .checkpoint import save_model
        path = check_path("path", path)
        optimizer = check_bool("optimizer", optimizer)
        save_model(self, path, optimizer=optimizer, extra=extra)

    @classmethod
    def from_gpt2_state_dict(cls, state_dict: Dict[str, Any], n_head: Optional[int] = None,
                             config: Any = None) -> "Model":
        """Build the equivalent stackformer model from a GPT-2 state dict (HF
        `GPT2LMHeadModel` or bare naming; NumPy or torch tensors). See stackformer.gpt2."""
        from .gpt2 import from_gpt2_state_dict
        return from_gpt2_state_dict(state_dict, n_head=n_head, config=config)

    @classmethod
    def load(cls, path: str) -> "Model":
        """Read a checkpoint written by save(); validates every name, shape and dtype and
        restores optimizer state when present."""
        from .checkpoint import load_model
        return load_model(cls, check_path("path", path))

    # -- forward ---------------------------------------------------------------------------------
    def __call__(self, x: Any, trace: Any = False, key_padding_mask: Optional[np.ndarray] = None,
                 return_hidden: bool = False, attnres_two_phase: bool = True,
                 n_threads: int = 0, patch: Optional[Mapping[str, Any]] = None,
                 ablate_sources: Optional[Mapping[Any, Any]] = None) -> Output:
        """Run the model.

        x: token ids (T,) or (B, T), any integer dtype (also a list, or bytes for byte-level
           models), or float embeddings (B, T, d_model). 1-D input is a batch of one.
        trace: False | True | TraceOptions | list of kinds ("attention", "hidden",
           "sublayer_outputs", "alpha", "depth_mass", "rms", "activations"; True = all but
           "activations", which run_with_cache turns on).
        key_padding_mask: (B, T) bool/int, 1 = real token, 0 = padding (masked as a key).
        return_hidden: return final hidden states (B, T, d) (after final norm) instead of logits.
        attnres_two_phase: Block AttnRes uses the paper's two-phase schedule (exact; False runs
           the direct computation, for checking).
        patch: {hook name: array or callable} replaces activations where run_with_cache
           records them (hook_embed, blocks.{i}.hook_resid_pre/mid/post, hook_attn_out,
           hook_mlp_out, AttnRes attn_res/mlp_res/output_res.hook_weights); a callable gets
           (activation, name) as it is in the patched run and returns the replacement.
        ablate_sources: {read: [sources]} removes depth sources from AttnRes reads (read: a
           sublayer index k, L = the output read, or a hook name such as "blocks.3.attn_res";
           sources: indices or alpha_labels() entries); the softmax renormalises over the rest.
           Both run in C (stackformer.patching) and leave the model untouched.
        Returns an Output with logits (B, T, V) float32 (or hidden_states) and trace.
        """
        x = _as_array(x, "x", self.config.vocab_size >= 256)
        opts = _trace_options(trace)
        return_hidden = check_bool("return_hidden", return_hidden)
        attnres_two_phase = check_bool("attnres_two_phase", attnres_two_phase)
        n_threads = check_int("n_threads", n_threads, 0)
        flags = opts.flags() if opts else 0
        layers = opts.layer_list() if opts else None
        core_patch = None
        if patch or ablate_sources:
            from .patching import build
            core_patch = build(self, x, key_padding_mask, patch, ablate_sources, n_threads, attnres_two_phase) or None
        logits, hidden, tr = self._c.forward(
            x, key_padding_mask, logits=not return_hidden, hidden=return_hidden,
            trace=flags, trace_layers=layers, two_phase=attnres_two_phase, n_threads=n_threads,
            patch=core_patch)
        trace_obj = None
        if opts is not None:
            T = (logits if logits is not None else hidden).shape[1]
            trace_obj = Trace(
                attention=tr.get("attention"), hidden=tr.get("hidden"),
                attn_out=tr.get("attn_out"), mlp_out=tr.get("mlp_out"),
                alpha=tr.get("alpha"), depth_mass=tr.get("depth_mass"), rms=tr.get("rms"),
                copy_rms=tr.get("copy_rms"), alpha_labels=self.alpha_labels() if "alpha" in tr else None, seq_len=T,
                embed=tr.get("embed"), hidden_mid=tr.get("hidden_mid"), q=tr.get("q"), k=tr.get("k"),
                v=tr.get("v"), z=tr.get("z"), mlp_post=tr.get("mlp_post"))
        return Output(logits=logits, hidden_states=hidden, trace=trace_obj)

    def run_with_cache(self, x: Any, key_padding_mask: Optional[np.ndarray] = None,
                       layers: Optional[Sequence[int]] = None, n_threads: int = 0):
        """TransformerLens-style: one traced forward pass recording everything, returned as
        (logits (B, T, V) float32, ActivationCache). The cache maps hook names
        ("blocks.3.attn.hook_pattern", "blocks.0.hook_resid_pre", ...) to read-only NumPy
        arrays, all copies the C core made during this pass; `layers` limits the per-block
        hooks to those blocks. See stackformer.hooks and docs/API.md for the names, shapes and
        which residual identities hold under which wiring."""
        from .hooks import run_with_cache
        return run_with_cache(self, x, key_padding_mask=key_padding_mask, layers=layers,
                              n_threads=n_threads)

    forward = __call__

    # -- training --------------------------------------------------------------------------------
    def forward_backward(self, inputs: Any, targets: Any, key_padding_mask: Optional[np.ndarray] = None,
                         ignore_index: int = -100, checkpoint: bool = False, n_threads: int = 0,
                         dropout_seed: int = 0) -> float:
        """Mean cross-entropy of logits(inputs) against targets (B, T) (entries equal to
        ignore_index are skipped: next-token targets for decoders, masked positions for
        encoders); gradients land in model.grads. checkpoint=True keeps only each block's
        input and recomputes the rest during the backward pass (less memory, more time).
        With config.attn_dropout / resid_dropout > 0 the dropout masks are a hash of
        (dropout_seed, optimizer step, position), so runs and resumed runs repeat exactly; pass
        a different dropout_seed per micro-batch when accumulating gradients."""
        byte_level = self.config.vocab_size >= 256
        inputs = _as_array(inputs, "inputs", byte_level)
        targets = _as_array(targets, "targets", byte_level)
        ignore_index = check_int("ignore_index", ignore_index, -2**31, 2**31 - 1)
        checkpoint = check_bool("checkpoint", checkpoint)
        n_threads = check_int("n_threads", n_threads, 0)
        dropout_seed = check_int("dropout_seed", dropout_seed)
        loss, count = self._c.forward_backward(inputs, targets, key_padding_mask,
                                               ignore_index=ignore_index,
                                               checkpoint=checkpoint, n_threads=n_threads,
                                               dropout_seed=dropout_seed % 2**64)
        if count == 0:
            raise ValueError("every target equals ignore_index: there is nothing to learn from")
        return float(loss)

    def optimizer_step(self, lr: float, betas: Sequence[float] = (0.9, 0.95), eps: float = 1e-8,
                       weight_decay: float = 0.1, clip_norm: float = 1.0) -> float:
        """One AdamW step from model.grads (decoupled weight decay on 2-D weights and
        embeddings, none on norms, biases and AttnRes pseudo-queries/gains; global-norm
        clipping at clip_norm, <= 0 disables). Returns the gradient norm before clipping. A
        non-finite gradient raises FloatingPointError and leaves the model unchanged."""
        lr = check_real("lr", lr)
        b1, b2 = check_pair("betas", betas)
        eps = check_real("eps", eps)
        weight_decay = check_real("weight_decay", weight_decay)
        clip_norm = check_real("clip_norm", clip_norm, finite=False)
        norm = self._c.adamw_step(lr, beta1=b1, beta2=b2, eps=eps,
                                  weight_decay=weight_decay, clip_norm=clip_norm)
        self.last_grad_norm = float(norm)
        return float(norm)

    def train_step(self, inputs: Any, targets: Any, lr: float = 1e-3, **kw: Any) -> float:
        """forward_backward + optimizer_step; returns the loss (before the update).
        Keyword arguments go to forward_backward (key_padding_mask, ignore_index, checkpoint,
        n_threads) or optimizer_step (betas, eps, weight_decay, clip_norm)."""
        fb = {k: kw.pop(k) for k in ("key_padding_mask", "ignore_index", "checkpoint", "n_threads", "dropout_seed") if k in kw}
        loss = self.forward_backward(inputs, targets, **fb)
        self.optimizer_step(lr, **kw)
        return loss

    def train_memory_bytes(self, batch_size: int, seq_len: int, checkpoint: bool = False) -> int:
        """Bytes of activation workspace one training step needs."""
        batch_size = check_int("batch_size", batch_size, 1)
        seq_len = check_int("seq_len", seq_len, 1)
        checkpoint = check_bool("checkpoint", checkpoint)
        return int(self._c.train_workspace_bytes(batch_size, seq_len, checkpoint))

    def check_finite(self) -> None:
        """Raise FloatingPointError naming every parameter tensor (and AdamW moment) that holds
        NaN or inf; return None when all are finite. NaN weights otherwise only show up as
        all-NaN logits."""
        params, _, adam_m, adam_v, _ = self._c.snapshot(True, False, True)
        bad = []
        for what, flat in (("", params), ("optimizer adam_m of ", adam_m), ("optimizer adam_v of ", adam_v)):
            if np.all(np.isfinite(flat)):
                continue
            for k, v in self._split(flat).items():
                n = int(v.size - np.count_nonzero(np.isfinite(v)))
                if n:
                    bad.append(f"{what}{k} ({n} of {v.size} values)")
        if bad:
            raise FloatingPointError("non-finite values in " + ", ".join(bad[:10])
                                     + (f" and {len(bad) - 10} more tensors" if len(bad) > 10 else ""))

    def release_memory(self) -> None:
        """Free the activation workspaces the model keeps between calls: the training one
        (between train steps) and the forward one (between forward calls; sized by the largest
        call so far). The next call re-creates what it needs, at the cost of page faults."""
        self._c.release_workspace()

    @property
    def step(self) -> int:
        """Optimizer steps taken."""
        return int(self._c.step)

    def optimizer_state(self) -> Dict[str, np.ndarray]:
        """Copies of AdamW's moments and step, for exact resumption."""
        _, _, m, v, step = self._c.snapshot(False, False, True)
        return {"adam_m": m, "adam_v": v, "step": np.array(step, dtype=np.int64)}

    def _snapshot(self, optimizer: bool) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, np.ndarray]]]:
        """(state_dict, optimizer_state or None) taken together as one consistent state."""
        p, _, m, v, step = self._c.snapshot(True, False, optimizer)
        opt = {"adam_m": m, "adam_v": v, "step": np.array(step, dtype=np.int64)} if optimizer else None
        return self._split(p), opt

    def load_optimizer_state(self, state: Dict[str, np.ndarray]) -> None:
        """Restore what optimizer_state() returned (checked before anything is written)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from optimizer_state(), got {type(state).__name__}")
        P = self.num_params
        for k in ("adam_m", "adam_v"):
            v = state.get(k)
            if not isinstance(v, np.ndarray) or v.shape != (P,) or v.dtype.kind != "f":
                raise ValueError(f"optimizer state {k!r} must be a float array of shape ({P},)")
            if not np.all(np.isfinite(v)):
                raise ValueError(f"optimizer state {k!r} contains NaN or inf")
        if np.any(np.asarray(state["adam_v"]) < 0):
            raise ValueError("optimizer state 'adam_v' (AdamW's second moment) must be >= 0: "
                             "a negative entry turns every parameter NaN at the next step")
        step = np.asarray(state.get("step", 0))
        if step.shape != () or step.dtype.kind not in "iu":
            raise ValueError(f"optimizer state 'step' must be an integer, got {state.get('step')!r}")
        step = int(step)
        if step < 0:
            raise ValueError("optimizer state 'step' must be >= 0")
        self._c.restore(None, None, np.asarray(state["adam_m"], dtype=np.float32),
                        np.asarray(state["adam_v"], dtype=np.float32), step)

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompt: Any, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, seed: Optional[int] = None,
                 return_text: bool = False) -> Union[np.ndarray, str, List[str]]:
        """Sample max_new_tokens after prompt with a key/value cache: the prompt is run once,
        then each new token costs one position. temperature 0 is greedy; top_k keeps the k
        most likely tokens; seed seeds the sampler (None: fresh entropy).

        prompt: token ids (T,) or (B, T) (array, list or bytes), or a str (its UTF-8 bytes)
            on a byte-level model (vocab_size >= 256).
        Returns the prompt with the new tokens appended, as ids of the prompt's rank; with
        return_text=True (byte-level models) the same sequence decoded from UTF-8 instead: a
        str for one prompt, a list of str for a batch (invalid UTF-8 and ids >= 256 become
        U+FFFD)."""
        c = self.config
        byte_level = c.vocab_size >= 256
        if not c.causal:
            raise ValueError("generate needs a causal (decoder) model")
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, 0)
        temperature = check_real("temperature", temperature, 0)
        top_k = check_optional_int("top_k", top_k, 1)
        if not isinstance(seed, np.random.Generator):
            seed = check_seed("seed", seed)
        return_text = check_bool("return_text", return_text)
        if return_text and not byte_level:
            raise ValueError(f"return_text=True decodes bytes, which needs a byte-level model "
                             f"(vocab_size >= 256); this one has vocab_size={c.vocab_size}")
        p = _as_array(prompt, "prompt", byte_level)
        if not isinstance(p, np.ndarray):
            raise TypeError(f"prompt must be token ids (array, list or bytes) or a str, got {type(p).__name__}")
        if p.dtype.kind not in "iu":
            raise TypeError(f"prompt must hold integer token ids, got dtype {p.dtype}")
        squeeze = p.ndim == 1
        p = np.atleast_2d(p).astype(np.int64)
        if p.ndim != 2 or p.shape[1] < 1:
            raise ValueError("prompt must have shape (T,) or (B, T) with T >= 1")
        total = p.shape[1] + max_new_tokens
        if total > c.max_seq_len:
            raise ValueError(f"prompt ({p.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len ({c.max_seq_len})")
        rng = np.random.default_rng(seed)
        cache = self._c.new_cache(p.shape[0], total)
        out = [p]
        logits = self._c.forward(p, cache=cache)[0][:, -1, :]
        for step in range(max_new_tokens):
            if not np.all(np.isfinite(logits)):
                raise FloatingPointError(
                    f"generate: the logits for new token {step} contain NaN or inf (the weights "
                    f"may not be finite: model.check_finite() names the tensors)")
            nxt = _sample(logits, temperature, top_k, rng)
            out.append(nxt[:, None])
            if step + 1 < max_new_tokens:
                logits = self._c.forward(nxt[:, None], cache=cache)[0][:, -1, :]
        seq = np.concatenate(out, axis=1)
        if return_text:
            texts = [_ids_to_text(row) for row in seq]
            return texts[0] if squeeze else texts
        return seq[0] if squeeze else seq

    # -- copies and pickling -----------------------------------------------------------------------
    # The weights live in C, so the default copy.copy would share them (a write to the copy
    # would change the original) and pickle cannot see them. Both copies are therefore full,
    # independent models, and pickling stores everything a training run depends on: config,
    # weights, gradients of the last backward pass, AdamW's moments and step (the step also
    # keys the dropout masks), so a copy or an unpickled model continues bit for bit.
    def _getstate(self) -> Dict[str, Any]:
        # one consistent copy, even while another thread trains (sf_model_snapshot)
        params, grads, adam_m, adam_v, step = self._c.snapshot(True, True, True)
        trained = step > 0 or bool(np.any(adam_m)) or bool(np.any(adam_v))
        state = {"format": PICKLE_FORMAT, "config": self.config.to_dict(),
                 "params": params, "step": int(step),
                 "last_grad_norm": self.last_grad_norm,
                 "checkpoint_extra": copy.deepcopy(self.checkpoint_extra)}
        if np.any(grads):
            state["grads"] = grads
        if trained:  # a fresh model's moments are all zeros: not stored
            state["adam_m"] = adam_m
            state["adam_v"] = adam_v
        return state

    @classmethod
    def _from_state(cls, state: Dict[str, Any]) -> "Model":
        if not isinstance(state, dict) or state.get("format") != PICKLE_FORMAT:
            raise ValueError(f"not a pickled stackformer model (expected format {PICKLE_FORMAT!r})")
        model = cls(Config.from_dict(dict(state["config"])), seed=0)
        P = model.num_params
        for key, dst in (("params", model._flat), ("grads", model._flat_grads),
                         ("adam_m", model._c.adam_m), ("adam_v", model._c.adam_v)):
            if key not in state:
                continue
            src = np.asarray(state[key])
            if src.shape != (P,) or src.dtype != np.float32:
                raise ValueError(f"pickled model: {key!r} must be float32 of shape ({P},)")
            np.copyto(dst, src)
        model._c.step = int(state["step"])
        model.last_grad_norm = state.get("last_grad_norm")
        model.checkpoint_extra = state.get("checkpoint_extra")
        return model

    def __reduce__(self):
        return (_model_from_state, (self._getstate(),))

    def __copy__(self) -> "Model":
        """A full, independent copy (same as copy.deepcopy): see the note above."""
        return Model._from_state(self._getstate())

    def __deepcopy__(self, memo: dict) -> "Model":
        return Model._from_state(self._getstate())

    # -- structure ---------------------------------------------------------------------------------
    def alpha_labels(self) -> List[List[str]]:
        """Source names for each depth aggregation k = 0..L (L = output):
        Full AttnRes: v0..vk; Block: b0..b{m-1} and the running partial sum b{m}^{i-1};
        DenseFormer: x0 (embedding) .. x{i} (block outputs) before sublayer 2i, none before MLPs;
        Hyper-Connections and mHC: the copies h1..hn every sublayer reads from."""
        c = self.config
        L = 2 * c.n_layers
        if c.residual == "plain":
            return []
        if c.residual in ("hyper_connections", "mhc"):
            # every sublayer reads a mix of the n copies of the stream (the head: their sum)
            return [[f"h{j + 1}" for j in range(c.hc_expansion)] for _ in range(L)] + [[]]
        if c.residual == "denseformer":
            # the DWA before sublayer k = 2i (and the head, k = L) mixes x0 = the embedding and
            # x1..x{i} = the block outputs; the MLPs read inside their block (no sources)
            return [[f"x{j}" for j in range(k // 2 + 1)] if k % 2 == 0 else [] for k in range(L + 1)]
        if c.residual == "attnres_full":
            out = [[f"v{i}" for i in range(k + 1)] for k in range(L + 1)]
        else:
            S = c.attnres_block_size
            out = []
            for k in range(L):
                m, i = k // S + 1, k % S
                labels = [f"b{j}" for j in range(m)]
                if i:
                    labels.append(f"b{m}^{i}")
                out.append(labels)
            out.append([f"b{j}" for j in range(1 + (L + S - 1) // S)])
        W = c.attnres_window  # sliding window: the embedding and the last W others
        return [lab if W is None or len(lab) <= 1 + W else lab[:1] + lab[-W:] for lab in out]

    def __repr__(self) -> str:
        if "_c" not in self.__dict__:
            return "Model(<not initialized>)"
        c = self.config
        kind = c.residual + ("+moda" if c.moda else "")
        return (f"Model({kind}, {c.n_layers} blocks, d_model={c.d_model}, heads={c.n_heads}/"
                f"{c.n_kv_heads}, {c.norm_position}-{c.norm}, {c.activation}, pos={c.pos}, "
                f"{'causal' if c.causal else 'bidirectional'}, {self.num_params:,} params)")


def _model_from_state(state: Dict[str, Any]) -> Model:
    """Unpickling entry point (module-level so pickle can name it)."""
    return Model._from_state(state)
