"""``python -m mlxq.convert``: HF safetensors folder / hub id, or a GGUF file -> mlx-lm folder.

Float layers are quantized to ``--q-bits`` / ``--q-group-size``; GGUF Q4_0/Q4_1/Q8_0 layers
are imported losslessly at their own bits/group, recorded as per-layer overrides in
config.json's ``quantization`` section (mlx-lm format, so ``mlx_lm.load`` reads the result).
The output is written by ``output_files.writing_folder``: a temporary sibling folder,
renamed into place at the end and marked as mlxq's (only such a folder ``--force`` replaces).
"""

import json
import sys
from collections import Counter
from pathlib import Path

from .errors import ArgumentParser, MlxqError, cli_main
from .output_files import check_output_folder, writing_folder

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
DTYPES = ("float16", "bfloat16", "float32")


def _validate_options(q_bits, q_group_size, dtype):
    if q_bits not in SUPPORTED_BITS:
        raise MlxqError(f"--q-bits {q_bits} is not supported; choose one of "
                        f"{', '.join(map(str, SUPPORTED_BITS))}")
    if q_group_size not in SUPPORTED_GROUP_SIZES:
        raise MlxqError(
            f"--q-group-size {q_group_size} is not supported; choose one of "
            f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}"
        )
    if dtype not in DTYPES:
        raise MlxqError(f"--dtype {dtype} is not supported; choose one of {', '.join(DTYPES)}")


def plan_quantization(model, native: dict, q_bits: int, q_group_size: int) -> dict:
    """Per-layer {path: {"group_size", "bits"}} for every Linear/Embedding of ``model``.

    Layers that arrive quantized keep their format; the rest get the requested one, which
    must divide their input width.
    """
    from .models.quantization import quantizable_layers

    plan = {}
    for path, module in quantizable_layers(model):
        if path in native:
            plan[path] = dict(native[path])
            continue
        width = module.weight.shape[-1]
        if width % q_group_size:
            fits = [g for g in SUPPORTED_GROUP_SIZES if width % g == 0]
            if not fits:  # no flag helps: the model's shape is the problem
                raise MlxqError(
                    f"the input width {width} of {path} is not a multiple of "
                    f"{SUPPORTED_GROUP_SIZES[0]}, the smallest quantization group; this "
                    "model's layer sizes (config.json) cannot be quantized")
            raise MlxqError(
                f"--q-group-size {q_group_size} does not divide the input width {width} "
                f"of {path}; try --q-group-size {fits[-1]}"
            )
        plan[path] = {"group_size": q_group_size, "bits": q_bits}
    return plan


def quantization_config(plan: dict) -> dict:
    """mlx-lm's section: the most common format at the top, the others as overrides."""
    counts = Counter((p["group_size"], p["bits"]) for p in plan.values())
    (group, bits), _ = counts.most_common(1)[0]
    section = {"group_size": group, "bits": bits, "mode": "affine"}
    for path, p in plan.items():
        if (p["group_size"], p["bits"]) != (group, bits):
            section[path] = {"group_size": p["group_size"], "bits": p["bits"]}
    return section


def _quantize_weights(weights: dict, plan: dict, native: dict, dtype, float_dtype, progress):
    """Quantize the float layers of ``plan`` in place; cast the other float tensors."""
    import mlx.core as mx
    from tqdm import tqdm

    todo = [p for p in plan if p not in native]
    bar = tqdm(todo, desc="quantizing", unit="layer", disable=not (progress and todo),
               file=sys.stderr, leave=False)
    for path in bar:
        key = f"{path}.weight"
        if key not in weights:
            continue  # reported by the completeness check
        p = plan[path]
        w = weights.pop(key).astype(dtype)
        q, scales, biases = mx.quantize(w, group_size=p["group_size"], bits=p["bits"])
        mx.eval(q, scales, biases)
        weights[key], weights[f"{path}.scales"], weights[f"{path}.biases"] = q, scales, biases
    quantized = {f"{p}.{s}" for p in plan for s in ("weight", "scales", "biases")}
    for k, v in list(weights.items()):
        if k not in quantized and float_dtype is not None and mx.issubdtype(v.dtype, mx.floating):
            weights[k] = v.astype(float_dtype)
    mx.eval(list(weights.values()))


def convert(
    hf_path,
    mlx_path="mlx_model",
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: str = "float16",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert ``hf_path`` (HF folder, hub id or .gguf file) into an mlx-lm folder.

    GGUF tensors that stay unquantized (norms, biases) keep their stored precision;
    ``dtype`` applies to the scales/biases of re-quantized layers and to float sources.
    Returns the output folder. Raises MlxqError for bad input, before any work.
    """
    _validate_options(q_bits, q_group_size, dtype)
    out = check_output_folder(mlx_path, force, source=hf_path)

    import mlx.core as mx
    import mlx.nn as nn

    from .model_config import build_checked
    from .safetensors_io import save_weights
    from .sources import GGUFSource, open_source
    from .tokenizer_files import check_tokenizer_files
    from .weight_check import check_weights

    source = open_source(hf_path)
    model = build_checked(source.config, source.path)
    plan = plan_quantization(model, source.native, q_bits, q_group_size)

    with writing_folder(out, force, written_by="mlxq.convert") as tmp:
        # The tokenizer first: checked against the embedding before the long part.
        token_ids = source.write_tokenizer(tmp)
        check_tokenizer_files(tmp, source.config.get("vocab_size"))
        weights = model.sanitize(source.read_weights(progress=progress))
        target = getattr(mx, dtype)
        float_dtype = None if isinstance(source, GGUFSource) else target
        _quantize_weights(weights, plan, source.native, target, float_dtype, progress)
        nn.quantize(model, class_predicate=lambda p, m: plan.get(p, False))
        check_weights(model, weights, "weights do not match the model config")
        save_weights(tmp, weights)
        del weights
        config = source.output_config()
        for k, v in token_ids.items():
            config.setdefault(k, v)
        config["quantization"] = quantization_config(plan)
        config["quantization_config"] = config["quantization"]
        (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))
    return out


def _parser():
    p = ArgumentParser(
        prog="python -m mlxq.convert",
        description="Convert a Hugging Face model (folder or hub id) or a GGUF file into an "
        "mlx-lm folder with quantized weights.",
    )
    p.add_argument("--hf-path", required=True, help="HF model folder, hub id, or .gguf file")
    p.add_argument("--mlx-path", default="mlx_model", help="output folder (default: mlx_model)")
    p.add_argument("--q-bits", type=int, default=4, help=f"weight bits {SUPPORTED_BITS} (default 4)")
    p.add_argument(
        "--q-group-size", type=int, default=64,
        help=f"quantization group size {SUPPORTED_GROUP_SIZES} (default 64); GGUF Q4_0/Q4_1/Q8_0 "
        "layers keep their own group of 32",
    )
    p.add_argument(
        "--dtype", default="float16", choices=DTYPES,
        help="dtype of unquantized parameters and new scales (default float16); GGUF "
        "tensors imported as they are keep their stored precision",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --mlx-path")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


@cli_main
def main(argv=None):
    args = _parser().parse_args(argv)
    from .backend import kernel_backend

    kernel_backend()  # a bad MLXQ_KERNELS is reported by every command, at once
    out = convert(
        args.hf_path,
        args.mlx_path,
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        dtype=args.dtype,
        force=args.force,
        # Bars only on a terminal, and cleared when done: an error stays one line.
        progress=not args.quiet and sys.stderr.isatty(),
    )
    print(f"[mlxq] wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
