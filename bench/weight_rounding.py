"""How much storing the default model's weights as float16 (`MODEL_WEIGHT_DTYPE=float16`)
changes them, next to what the 4-bit quantization of the shipped GGUF already did.

    python bench/weight_rounding.py

The GGUF stores each decoder weight as Q4_1: blocks of 32 values, each value one of 16
evenly spaced levels between the block's minimum and maximum. So a de-quantized weight
sits within half a step, (max - min) / 15 / 2, of the original, and the rounding's RMS
is step / sqrt(12) (uniform within the step). Float16 rounding is measured exactly:
float32 -> float16 -> float32. Both are given relative to the weights' RMS, over the
matrices of the decoder layers (the token embedding is Q8_0 in the file).

Prints one JSON line: {"weights", "q4_1_rounding_rel_rms", "float16_rounding_rel_rms",
"q4_1_over_float16", "float16_exact_share"}.
"""

from __future__ import annotations

import json
import math

from common import load_default_engine

Q4_1_BLOCK = 32
Q4_1_STEPS = 15


def main() -> None:
    import torch

    engine = load_default_engine("off")
    weights = squares = q4_1 = half = exact = 0.0
    with torch.no_grad():
        for name, w in engine.hf_model.named_parameters():
            if w.dim() != 2 or "embed" in name or "lm_head" in name:
                continue
            w = w.detach().float()
            blocks = w.reshape(-1, Q4_1_BLOCK)
            step = (blocks.max(dim=1).values - blocks.min(dim=1).values) / Q4_1_STEPS
            q4_1 += float((step.double() ** 2 / 12).sum()) * Q4_1_BLOCK
            rounded = w.half().float()
            half += float(((rounded - w).double() ** 2).sum())
            exact += float((rounded == w).sum())
            squares += float((w.double() ** 2).sum())
            weights += w.numel()
    figures = {
        "weights": int(weights),
        "q4_1_rounding_rel_rms": round(math.sqrt(q4_1 / squares), 5),
        "float16_rounding_rel_rms": round(math.sqrt(half / squares), 7),
        "q4_1_over_float16": round(math.sqrt(q4_1 / half), 1),
        "float16_exact_share": round(exact / weights, 3),
    }
    print(
        f"Q4_1 rounding: {100 * figures['q4_1_rounding_rel_rms']:.2f}% of the weights' RMS; "
        f"float16 rounding: {100 * figures['float16_rounding_rel_rms']:.4f}% "
        f"({figures['q4_1_over_float16']}x smaller); "
        f"{100 * figures['float16_exact_share']:.0f}% of the weights are exact in float16"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
