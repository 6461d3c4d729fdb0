"""Compiling and loading the fast decode step (`fast_step.LlamaDecodeStep`) with
inductor: a graph per kernel that some batch size uses (see `fast_step.KERNELS`), and
one row's on its own, each traced once with dynamic batch and cache sizes, on a
background thread while the bot answers with the HF forward. A cold inductor cache is
filled by a child process first (``python -m bot.model.hf.fast_decoder``), so that
quitting never waits inside torch's C++ code.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from bot.model.hf import fast_step
from bot.model.hf.fast_step import (
    KERNELS,
    Graph,
    Kernel,
    LlamaDecodeStep,
    WeightDtype,
    graph_for,
    weight_store,
)

logger = logging.getLogger(__name__)

CompileMode = Literal["auto", "off"]

# Sizes of the first (tracing) call: distinct from each other and above 1, so that no
# two dynamic dimensions are taken for one and none is specialised to 0 or 1.
_TRACE_ROWS, _TRACE_WIDTH, _TRACE_CAPACITY = 2, 5, 7
_PROGRESS = "progress: "


def compiler_missing() -> str | None:
    """Why inductor cannot build CPU kernels here (no C++ compiler), or None."""
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None and shutil.which("g++") is None and shutil.which("clang++") is None:
        return "no C++ compiler found (install g++ or set CXX)"
    return None


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
    """Arguments of `python -m bot.model.hf.fast_decoder` that load the same model: a cold
    compile runs in that child process (see `FastDecoder.start`). Empty: compile here."""

    @property
    def marker(self) -> Path:
        """Written once a child has filled the inductor cache for these settings and
        this version of the step's code and of torch."""
        return self.cache_dir / f"compiled-{self.weight_dtype}-{self.threads}threads-{_code_version()}"


@functools.cache
def _code_version() -> str:
    """A short hash of the step's and this module's source and the torch version: a
    marker from other code must not stop a cold cache from being filled in the child
    process."""
    digest = hashlib.sha256(Path(fast_step.__file__).read_bytes())
    digest.update(Path(__file__).read_bytes())
    digest.update(torch.__version__.encode())
    return digest.hexdigest()[:12]


class FastDecoder:
    """The compiled decode step for one model: a graph per kernel that some batch size
    uses (`fast_step.KERNELS`; all of `graphs`, when given), with one row's
    multiply-and-sum on its own; batch and length dimensions are dynamic. `start`
    compiles them on a background thread, one user's graph first; a batch whose graph
    is not ready yet takes the HF forward."""

    def __init__(
        self,
        model: Any,
        *,
        context_length: int,
        config: FastStepConfig,
        compiled: bool = True,
        graphs: Sequence[Graph] = (),
    ) -> None:
        self.config = config
        # Every graph some batch size takes, in the order of the row counts they serve.
        starts = sorted({1, 2, *(start for start, _ in KERNELS[config.weight_dtype])})
        wanted = list(graphs) or [graph_for(rows, config.weight_dtype) for rows in starts]
        self._graphs: tuple[Graph, ...] = tuple(dict.fromkeys(wanted))
        # One step module per kernel; the matmul kernels share the model's float32 weights.
        self._steps: dict[Kernel, LlamaDecodeStep] = {}
        for graph in self._graphs:
            kernel = _kernel_of(graph)
            if kernel not in self._steps:
                store = weight_store(kernel, config.weight_dtype)
                shared = next((step for step in self._steps.values() if step.store == store), None)
                self._steps[kernel] = LlamaDecodeStep(
                    model,
                    context_length=context_length,
                    weight_dtype=config.weight_dtype,
                    kernel=kernel,
                    shared=shared,
                )
        self._compiled = compiled
        # The callable per graph: the eager module until its compiled graph is loaded.
        self._fns: dict[Graph, Callable[..., Any]] = {g: self._steps[_kernel_of(g)] for g in self._graphs}
        # Set once a graph is traced and loaded; read by the scheduler thread.
        self._ready: dict[Graph, threading.Event] = {g: threading.Event() for g in self._graphs}
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

    def graph(self, graph: Graph) -> Callable[..., Any]:
        """The step of `graph` (one of those compiled here): compiled once it is ready."""
        return self._fns[graph]

    def wait(self, timeout: float | None = None, graph: Graph | None = None) -> bool:
        """Block until every graph (or just `graph`) is ready, compiling has failed, or
        `timeout` has passed; True when it is ready."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for name in (graph,) if graph is not None else self._graphs:
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
        A cold cache is first filled by a child process (a minute or two), so the bot can
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
        fn = self._fns[graph_for(int(ids.shape[0]), self.config.weight_dtype)]
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
        say("Compiling the fast decode step in the background (first start: a minute or two; cached afterwards)")
        command = [sys.executable, "-m", "bot.model.hf.fast_decoder", *self.config.child_args]
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
        compiled = {kernel: torch.compile(step, fullgraph=True) for kernel, step in self._steps.items()}
        for graph in self._graphs:
            if self._stopping:
                return
            t = time.perf_counter()
            kernel = _kernel_of(graph)
            _trace(compiled[kernel], self._steps[kernel], 1 if graph == "one" else _TRACE_ROWS)
            self._fns[graph] = compiled[kernel]
            self._ready[graph].set()
            name = "one-row" if graph == "one" else graph.replace("_", " ")
            say(f"{done} the {name} decode step in {time.perf_counter() - t:.1f} s")


def _kernel_of(graph: Graph) -> Kernel:
    """The kernel a graph runs (one row's is multiply-and-sum)."""
    return "mulsum" if graph == "one" else graph


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
