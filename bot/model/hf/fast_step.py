"""A plain-torch, inductor-compiled decode step for Llama-family models (Llama, Mistral,
SmolLM2: RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or untied embeddings).

Why: on a CPU, one user's decode step is bound by how fast the weights are read.
PyTorch's float32 matrix-vector product reads them at about 10 GB/s here; the same
product written as an elementwise multiply followed by a sum over the input dimension
becomes an inductor-generated kernel that reads 17-22 GB/s, and storing the weights as
float16 (math in float32) halves the bytes. For many rows a plain matmul wins again
(see `MATMUL_MIN_ROWS`). Measured figures: shared/notes/decode-speed-on-cpu.md and
`bench/single_user.py`.

The step serves the engine's continuous batch as it is: left-padded rows, per-row
positions, a 2-D mask over the KV cache columns. It never writes the cache: it attends
to the cached columns plus the new token (one softmax over both) and returns the new
token's keys and values, which the engine appends. Batch, cache width and cache capacity
are dynamic from the first call, so one graph per kernel choice serves every shape, as
long as the cache has a spare column (a full one fails the guards: the runner reserves
one).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import torch

logger = logging.getLogger(__name__)

CompileMode = Literal["auto", "off"]
WeightDtype = Literal["float32", "float16"]

# From this many rows on, a matmul (float32 weights) beats the multiply-and-sum kernel,
# by how the multiply-and-sum kernel stores its weights. It reads every weight once per
# row, so float16's halved bytes keep it ahead for longer. Measured on 2 quiet EPYC
# cores with SmolLM2-135M, 120 cached columns (bench/fast_step_crossover.py, median ms
# per step, mulsum vs matmul): float32 8 rows 61 vs 57, 16 rows 121 vs 79, 32 rows 228
# vs 119; float16 8 rows 40 vs 56, 12 rows 57 vs 63, 16 rows 72 vs 70, 32 rows 136 vs 95.
MATMUL_MIN_ROWS: Final[Mapping[WeightDtype, int]] = {"float32": 8, "float16": 16}

_FAMILY = frozenset({"llama", "mistral"})
# Sizes of the first (tracing) call: distinct from each other and above 1, so that no
# two dynamic dimensions are taken for one and none is specialised to 0 or 1.
_TRACE_ROWS, _TRACE_WIDTH, _TRACE_CAPACITY = 2, 5, 7
_PROGRESS = "progress: "


def unsupported_reason(model: Any) -> str | None:
    """Why `model` cannot use the fast step, or None when it can."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILY:
        return f"architecture {model_type!r} is not in the Llama family"
    checks = {
        "hidden_act is not silu": getattr(config, "hidden_act", "silu") != "silu",
        "attention has biases": bool(getattr(config, "attention_bias", False)),
        "MLP has biases": bool(getattr(config, "mlp_bias", False)),
        "tensor-parallel pretraining split": getattr(config, "pretraining_tp", 1) not in (1, None),
        "sliding-window attention": getattr(config, "sliding_window", None) is not None,
    }
    for reason, failed in checks.items():
        if failed:
            return reason
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "unexpected module layout"
    if next(model.parameters()).device.type != "cpu":
        return "the model is not on the CPU"
    return None


def compiler_missing() -> str | None:
    """Why inductor cannot build CPU kernels here (no C++ compiler), or None."""
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None and shutil.which("g++") is None and shutil.which("clang++") is None:
        return "no C++ compiler found (install g++ or set CXX)"
    return None


class LlamaDecodeStep(torch.nn.Module):
    """One decode step for every row of the batch, with weights taken from a loaded HF
    Llama-family model. ``kernel`` is "mulsum" (weights as `weight_dtype`, products as
    multiply-and-sum) or "matmul" (the model's own float32 weights, products as matmul)."""

    def __init__(
        self,
        model: Any,
        *,
        context_length: int,
        weight_dtype: WeightDtype,
        kernel: Literal["mulsum", "matmul"],
        shared: LlamaDecodeStep | None = None,
    ) -> None:
        super().__init__()
        config = model.config
        inner = model.model
        self.kernel = kernel
        self.n_layers = len(inner.layers)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.n_heads)
        self.scale = self.head_dim**-0.5
        self.eps = float(config.rms_norm_eps)
        store = torch.float16 if kernel == "mulsum" and weight_dtype == "float16" else torch.float32

        def weight(t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            # float32 weights are the HF model's own tensors: no copy, no extra memory.
            return t if t.dtype == store else t.to(store).contiguous()

        def norm(t: torch.Tensor) -> torch.Tensor:
            return t.detach().float()

        self.embed = inner.embed_tokens.weight.detach().float()
        self.lm_head: torch.Tensor
        self.layers: list[tuple[torch.Tensor, ...]]
        if shared is not None and shared.lm_head.dtype == store:
            self.lm_head = shared.lm_head
            self.layers = shared.layers
        else:
            self.lm_head = weight(model.get_output_embeddings().weight)
            with torch.no_grad():
                self.layers = [
                    (
                        _fused((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj), store),
                        weight(layer.self_attn.o_proj.weight),
                        _fused((layer.mlp.gate_proj, layer.mlp.up_proj), store),
                        weight(layer.mlp.down_proj.weight),
                    )
                    for layer in inner.layers
                ]
        self.norms = [
            (norm(layer.input_layernorm.weight), norm(layer.post_attention_layernorm.weight)) for layer in inner.layers
        ]
        self.final_norm = norm(inner.norm.weight)
        # RoPE tables from the model's own rotary module (any rope scaling it has), for
        # every position of the context: row p is what HF computes for position p.
        with torch.inference_mode():
            positions = torch.arange(context_length)[None]
            probe = torch.zeros((), dtype=torch.float32)
            cos, sin = inner.rotary_emb(probe, positions)
        self.cos = cos[0].float().contiguous()
        self.sin = sin[0].float().contiguous()

    def _linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.kernel == "matmul":
            return x @ w.t()
        # [rows, in] x [out, in] -> [rows, out]: inductor turns this into one reduction
        # kernel that streams the weights (converting float16 in registers).
        return (x[:, None, :] * w[None, :, :].float()).sum(-1)

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = self.head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    # Traced and compiled once, then stamped out for every layer: tracing 30 unrolled
    # layers was most of a warm start (7 s of a graph's 7.5 s) and of a cold compile.
    @torch.compiler.nested_compile_region
    def _layer(
        self,
        h: torch.Tensor,
        wqkv: torch.Tensor,
        wo: torch.Tensor,
        wgu: torch.Tensor,
        wd: torch.Tensor,
        ln1: torch.Tensor,
        ln2: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        masked: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder layer: the new hidden state, and the new token's keys and values
        stacked ``[2, rows, kv heads, head dim]``. `keys` and `values` are the layer's
        whole cache; its first ``masked.shape[-1]`` columns are attended. (Sliced here,
        not by the caller: inductor needs a region input's strides to be built from
        sizes of the region's own inputs.)"""
        rows = h.shape[0]
        width = masked.shape[-1]
        group = self.n_heads // self.n_kv
        n_q, n_kv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        x = self._rms(h, ln1)
        qkv = self._linear(x, wqkv)
        q = self._rope(qkv[:, :n_q].reshape(rows, self.n_heads, self.head_dim), cos, sin)
        k = self._rope(qkv[:, n_q : n_q + n_kv].reshape(rows, self.n_kv, self.head_dim), cos, sin)
        v = qkv[:, n_q + n_kv :].reshape(rows, self.n_kv, self.head_dim)
        qg = q.view(rows, self.n_kv, group, self.head_dim)
        scores_past = torch.matmul(qg, keys[:, :, :width].transpose(-1, -2)) * self.scale + masked
        score_new = (qg * k[:, :, None, :]).sum(-1, keepdim=True) * self.scale
        probs = torch.softmax(torch.cat((scores_past, score_new), dim=-1), dim=-1)
        attn = torch.matmul(probs[..., :-1], values[:, :, :width]) + probs[..., -1:] * v[:, :, None, :]
        h = h + self._linear(attn.reshape(rows, self.n_heads * self.head_dim), wo)
        x = self._rms(h, ln2)
        gate_up = self._linear(x, wgu)
        gate, up = gate_up[:, : wgu.shape[0] // 2], gate_up[:, wgu.shape[0] // 2 :]
        h = h + self._linear(torch.nn.functional.silu(gate) * up, wd)
        # One fresh tensor: returned on their own, the values (a view of `qkv`) came
        # out of the compiled region as garbage.
        return h, torch.stack((k, v))

    def forward(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, kv: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``ids``, ``positions`` ``[rows]``; ``mask`` ``[rows, width]`` (True = a cached
        token to attend to); ``kv`` = keys and values per layer, ``[rows, kv heads,
        capacity, head dim]`` each, of which the first `width` columns are the cache.
        Returns the logits ``[rows, vocab]`` and the new token's keys and values,
        ``[layers, rows, kv heads, head dim]`` each."""
        width = mask.shape[1]
        torch._check(width <= kv[0].shape[2])  # type: ignore[no-untyped-call]  # so that slicing the cache yields `width` columns
        h = self.embed[ids]
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        masked = torch.where(mask, 0.0, float("-inf"))[:, None, None, :]  # [rows, 1, 1, width]
        new_kv: list[torch.Tensor] = []
        for i in range(self.n_layers):
            h, new = self._layer(h, *self.layers[i], *self.norms[i], cos, sin, masked, kv[2 * i], kv[2 * i + 1])
            new_kv.append(new)
        logits = self._linear(self._rms(h, self.final_norm), self.lm_head)
        stacked = torch.stack(new_kv, dim=1)
        return logits, stacked[0], stacked[1]


def _fused(modules: Sequence[Any], store: torch.dtype) -> torch.Tensor:
    """The weights of `modules` (linear layers reading the same input) stacked along
    the output dimension as `store`: one kernel reads them all. When they already are
    `store`, the modules' own weights become views of the stacked tensor, so the HF
    forward and this step share one copy."""
    weights = [m.weight.detach() for m in modules]
    fused = torch.cat(weights).to(store).contiguous()
    if weights[0].dtype == store:
        start = 0
        for module, w in zip(modules, weights, strict=True):
            module.weight = torch.nn.Parameter(fused[start : start + w.shape[0]], requires_grad=False)
            start += w.shape[0]
    return fused


@dataclass(frozen=True, slots=True)
class FastStepConfig:
    """How the fast step is built: `mode` and `weight_dtype` come from the settings,
    `cache_dir` is where inductor keeps compiled kernels, `threads` is the fixed
    intra-op thread count every compiled call runs with."""

    mode: CompileMode
    weight_dtype: WeightDtype
    cache_dir: Path
    threads: int
    child_args: tuple[str, ...] = ()
    """Arguments of `python -m bot.model.hf.fast_step` that load the same model: a cold
    compile runs in that child process (see `FastDecoder.start`). Empty: compile here."""

    @property
    def marker(self) -> Path:
        """Written once a child has filled the inductor cache for these settings and
        this version of the step's code and of torch."""
        return self.cache_dir / f"compiled-{self.weight_dtype}-{self.threads}threads-{_code_version()}"


@functools.cache
def _code_version() -> str:
    """A short hash of this module's source and the torch version: a marker from other
    code must not stop a cold cache from being filled in the child process."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(torch.__version__.encode())
    return digest.hexdigest()[:12]


Graph = Literal["one", "few", "many"]
"""The compiled graphs: one row and few rows (multiply-and-sum), many rows (matmul)."""


def graph_for(rows: int, weight_dtype: WeightDtype) -> Graph:
    """Which graph serves a batch of `rows`."""
    return "one" if rows == 1 else "few" if rows < MATMUL_MIN_ROWS[weight_dtype] else "many"


class FastDecoder:
    """The compiled decode step for one model: a graph for one row and one for a few
    rows (multiply-and-sum), and one for many rows (matmul); batch and length
    dimensions are dynamic. `start` compiles them on a background thread, one user's
    graph first; a batch whose graph is not ready yet takes the HF forward."""

    def __init__(self, model: Any, *, context_length: int, config: FastStepConfig, compiled: bool = True) -> None:
        self.config = config
        self._few = LlamaDecodeStep(
            model, context_length=context_length, weight_dtype=config.weight_dtype, kernel="mulsum"
        )
        self._many = LlamaDecodeStep(
            model,
            context_length=context_length,
            weight_dtype=config.weight_dtype,
            kernel="matmul",
            shared=self._few,
        )
        self._compiled = compiled
        self._few_fn: Callable[..., Any] = self._few
        self._many_fn: Callable[..., Any] = self._many
        # Set once a graph is traced and loaded; read by the scheduler thread.
        self._ready: dict[Graph, threading.Event] = {g: threading.Event() for g in ("one", "few", "many")}
        self.failed: str | None = None
        """Why compiling failed (the engine then stays on the HF forward), or None."""
        self._thread: threading.Thread | None = None
        self._child: subprocess.Popen[str] | None = None
        self._stopping = False
        if not compiled:
            for event in self._ready.values():
                event.set()

    @property
    def compiled(self) -> bool:
        """False for the plain-torch step run eagerly (tests of its maths)."""
        return self._compiled

    @property
    def ready(self) -> bool:
        """True once every graph is compiled and loaded."""
        return all(event.is_set() for event in self._ready.values())

    def usable(self, rows: int) -> bool:
        """True when the graph for a batch of `rows` is ready."""
        return self._ready[graph_for(rows, self.config.weight_dtype)].is_set()

    @property
    def kernels(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """The few-row (multiply-and-sum) and many-row (matmul) steps, compiled once ready."""
        return self._few_fn, self._many_fn

    def wait(self, timeout: float | None = None, graph: Graph | None = None) -> bool:
        """Block until every graph (or just `graph`) is ready, compiling has failed, or
        `timeout` has passed; True when it is ready."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for name in (graph,) if graph is not None else ("one", "few", "many"):
            while not self._ready[name].is_set():
                if self._thread is None or not self._thread.is_alive():
                    return self._ready[name].is_set()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._ready[name].wait(0.1 if left is None else min(left, 0.1))
        return True

    def start(self, progress: Callable[[str], None] | None = None) -> None:
        """Load the graphs on a thread of their own: seconds from a warm inductor cache.
        A cold cache is first filled by a child process (minutes), so that the bot can
        exit at any time: a thread inside torch's C++ code when the interpreter exits
        aborts the process, a child is simply stopped (`stop`, also run at exit)."""
        if self._compiled and self._thread is None:
            self._thread = threading.Thread(target=self._compile, args=(progress,), name="decode-compile", daemon=True)
            self._thread.start()
            atexit.register(self.stop)

    def stop(self) -> None:
        """Stop compiling: end the child process, wait for the thread (a warm load takes
        seconds)."""
        self._stopping = True
        child = self._child
        if child is not None and child.poll() is None:
            child.terminate()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, kv: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fn = self._many_fn if graph_for(int(ids.shape[0]), self.config.weight_dtype) == "many" else self._few_fn
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = fn(ids, positions, mask, list(kv))
        return out

    def _compile(self, progress: Callable[[str], None] | None) -> None:
        say = progress or (lambda line: logger.info("%s", line))
        started = time.perf_counter()
        try:
            if self.config.child_args and not self.config.marker.is_file():
                self._compile_in_child(say)
            if self._stopping:
                return
            self._load_graphs(say)
            say(f"Fast decode step ready in {time.perf_counter() - started:.1f} s")
        except Exception as exc:  # the HF forward keeps serving; say why once
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            for event in self._ready.values():
                event.clear()
            logger.warning("The compiled decode step is unavailable (%s); using the HF forward", self.failed)
            logger.debug("Compiling the decode step failed", exc_info=True)

    def _compile_in_child(self, say: Callable[[str], None]) -> None:
        say("Compiling the fast decode step in the background (first start: minutes; cached afterwards)")
        command = [sys.executable, "-m", "bot.model.hf.fast_step", *self.config.child_args]
        command += [self.config.weight_dtype, str(self.config.threads), str(self.config.cache_dir)]
        root = str(Path(__file__).resolve().parents[3])  # the child imports this package as we do
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert self._child.stdout is not None
        tail: list[str] = []
        for line in self._child.stdout:  # progress lines, relayed as they come
            line = line.rstrip()
            if line.startswith(_PROGRESS):
                say(line.removeprefix(_PROGRESS))
            elif line:
                tail = [*tail[-4:], line]
        code = self._child.wait()
        if code != 0 and not self._stopping:
            raise RuntimeError(f"the compile process exited with code {code}: {' | '.join(tail)}")

    def compile_here(self, say: Callable[[str], None]) -> None:
        """Compile every graph in this process and thread (the child's job)."""
        self._load_graphs(say, "Compiled")
        self.config.marker.write_text("ok\n")

    def _load_graphs(self, say: Callable[[str], None], done: str = "Loaded") -> None:
        configure_inductor(self.config.cache_dir)
        torch.set_num_threads(self.config.threads)
        few = torch.compile(self._few, fullgraph=True)
        many = torch.compile(self._many, fullgraph=True)
        plan: list[tuple[Graph, Callable[..., Any], int, str]] = [
            ("one", few, 1, "one-row"),
            ("few", few, _TRACE_ROWS, "few-row"),
            ("many", many, _TRACE_ROWS, "many-row"),
        ]
        for graph, fn, rows, name in plan:
            if self._stopping:
                return
            t = time.perf_counter()
            _trace(fn, self._few, rows)
            if graph == "many":
                self._many_fn = many
            else:
                self._few_fn = few
            self._ready[graph].set()
            say(f"{done} the {name} decode step in {time.perf_counter() - t:.1f} s")


def _trace(fn: Callable[..., Any], step: LlamaDecodeStep, rows: int) -> None:
    """A first call with every dynamic dimension marked, so that later shapes reuse its
    graph. Dynamo specialises a dimension of size 1 even then, so a single row (the
    common case: one user) is traced on its own; widths and capacities stay dynamic."""
    width, capacity = _TRACE_WIDTH, _TRACE_CAPACITY
    # Inference tensors, like the engine's: guards check the dispatch keys too.
    with torch.inference_mode():
        ids = torch.zeros(rows, dtype=torch.long)
        positions = torch.full((rows,), width, dtype=torch.long)
        mask = torch.ones((rows, width), dtype=torch.bool)
        kv = [torch.zeros((rows, step.n_kv, capacity, step.head_dim)) for _ in range(2 * step.n_layers)]
        if rows > 1:
            for t in (ids, positions, mask, *kv):
                torch._dynamo.mark_dynamic(t, 0)
        torch._dynamo.mark_dynamic(mask, 1)
        for t in kv:
            torch._dynamo.mark_dynamic(t, 2)
        fn(ids, positions, mask, kv)


def configure_inductor(cache_dir: Path) -> None:
    """Point inductor's on-disk caches at `cache_dir` (the environment variable is the
    only switch inductor reads for it)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 8)
    inductor_config.fx_graph_cache = True


def _main(argv: Sequence[str]) -> int:
    """The compile process: ``MODEL CACHE_DIR CONTEXT_TOKENS DTYPE WEIGHT_DTYPE THREADS
    INDUCTOR_DIR`` (MODEL empty for the default model). Loads the model like the bot,
    compiles every graph into INDUCTOR_DIR, then writes the marker."""
    from bot.model.hf.loader import load_engine

    model, cache_dir, context_tokens, dtype, weight_dtype, threads, inductor_dir = argv

    def say(line: str) -> None:
        print(f"{_PROGRESS}{line}", flush=True)

    engine = load_engine(
        model or None, dtype=dtype, cache_dir=Path(cache_dir), context_tokens=int(context_tokens), compile_mode="off"
    )
    config = FastStepConfig(
        mode="auto",
        weight_dtype="float16" if weight_dtype == "float16" else "float32",
        cache_dir=Path(inductor_dir),
        threads=int(threads),
    )
    FastDecoder(engine.hf_model, context_length=engine.context_length, config=config).compile_here(say)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
