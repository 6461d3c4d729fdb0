"""A plain-torch, inductor-compiled decode step for Llama-family models (Llama, Mistral,
SmolLM2: RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or untied embeddings).

Why: on a CPU, one user's decode step is bound by how fast the weights are read.
PyTorch's float32 matrix-vector product reads them at about 10 GB/s here; the same
product written as an elementwise multiply followed by a sum over the input dimension
becomes an inductor-generated kernel that reads 17-22 GB/s, and storing the weights as
float16 (math in float32) halves the bytes. For several rows a matmul wins again (see
`KERNELS`). Measured figures: shared/notes/decode-speed-on-cpu.md and
`bench/single_user.py`.

The step serves the engine's continuous batch as it is: left-padded rows, per-row
positions, a 2-D mask over the KV cache columns. It never writes the cache: it attends
to the cached columns plus the new token (one softmax over both) and returns the new
token's keys and values, which the engine appends. Batch, cache width and cache capacity
are dynamic from the first call, so one graph per kernel choice serves every shape, as
long as the cache has a spare column (a full one fails the guards: the runner reserves
one). `fast_decoder` compiles and loads the graphs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal, get_args

import torch

WeightDtype = Literal["float32", "float16"]

Kernel = Literal["mulsum", "matmul_wx", "matmul_xw"]
"""How the step's matrix products run: "mulsum", multiply-and-sum kernels that stream
the weights (stored as the weight dtype); "matmul_wx", ``(w @ x.T).T``, and "matmul_xw",
``x @ w.T``: the same float32 product through MKL with the weights as the left or the
right operand, which MKL runs at very different speeds depending on the row count."""

# The kernel for each batch size: (from this many rows, kernel). Measured on 2 EPYC
# cores with SmolLM2-135M, 120 cached columns, all compiled in one process and timed
# interleaved (ms per step, bench/fast_step_crossover.py; the machine was shared, so
# only the order is firm). float32: 2 rows mulsum 28, w@x 26, x@w 86; 4 rows 38, 31, 66; 8 rows 69, 73,
# 63; 12 rows 125, 91, 77; 16 rows 122, 78, 111; 32 rows 240, 110, 143. float16 weights
# against w@x: 2 rows 17 vs 36; 8 rows 60 vs 75; 12 rows 76 vs 104; 16 rows 116 vs 98;
# 32 rows 173 vs 115. Multiply-and-sum reads every weight once per row; MKL's x@w is
# slow below 8 rows (a matrix-vector product per row) and w@x from 8 to 12.
KERNELS: Final[Mapping[WeightDtype, tuple[tuple[int, Kernel], ...]]] = {
    "float32": ((1, "mulsum"), (2, "matmul_wx"), (8, "matmul_xw"), (13, "matmul_wx")),
    "float16": ((1, "mulsum"), (16, "matmul_wx")),
}

_FAMILY = frozenset({"llama", "mistral"})

Graph = Literal["one", "mulsum", "matmul_wx", "matmul_xw"]
"""The compiled graphs: one per kernel, and one row's multiply-and-sum on its own (a
dimension of size 1 is specialised)."""


def kernel_for(rows: int, weight_dtype: WeightDtype) -> Kernel:
    """Which kernel serves a batch of `rows`."""
    return next(kernel for start, kernel in reversed(KERNELS[weight_dtype]) if rows >= start)


def weight_store(kernel: Kernel, weight_dtype: WeightDtype) -> torch.dtype:
    """How `kernel` stores the weights: multiply-and-sum as `weight_dtype`, a matmul as
    float32 (the model's own tensors)."""
    return torch.float16 if kernel == "mulsum" and weight_dtype == "float16" else torch.float32


def graph_for(rows: int, weight_dtype: WeightDtype) -> Graph:
    """Which graph serves a batch of `rows`."""
    return "one" if rows == 1 else kernel_for(rows, weight_dtype)


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


class LlamaDecodeStep(torch.nn.Module):
    """One decode step for every row of the batch, with weights taken from a loaded HF
    Llama-family model. With the "mulsum" `Kernel` the weights are stored as
    `weight_dtype`; the matmul kernels use the model's own float32 weights."""

    def __init__(
        self,
        model: Any,
        *,
        context_length: int,
        weight_dtype: WeightDtype,
        kernel: Kernel,
        shared: LlamaDecodeStep | None = None,
    ) -> None:
        """`shared`: a step whose weights this one reuses when both store them alike."""
        super().__init__()
        if kernel not in get_args(Kernel):
            raise ValueError(f"unknown kernel {kernel!r}")
        config = model.config
        inner = model.model
        self.kernel = kernel
        self.n_layers = len(inner.layers)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.n_heads)
        self.scale = self.head_dim**-0.5
        self.eps = float(config.rms_norm_eps)
        store = weight_store(kernel, weight_dtype)
        self.store = store

        def weight(t: torch.Tensor) -> torch.Tensor:
            t = t.detach()
            # float32 weights are the HF model's own tensors: no copy, no extra memory.
            return t if t.dtype == store else t.to(store).contiguous()

        def norm(t: torch.Tensor) -> torch.Tensor:
            return t.detach().float()

        self.embed = inner.embed_tokens.weight.detach().float()
        self.lm_head: torch.Tensor
        self.layers: list[tuple[torch.Tensor, ...]]
        if shared is not None and shared.store == store:
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
        if self.kernel == "matmul_wx":
            return (w @ x.t()).t()
        if self.kernel == "matmul_xw":
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
