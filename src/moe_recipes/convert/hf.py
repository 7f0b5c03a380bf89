"""Checkpoint -> Hugging Face folder (`moe-recipes convert`), in one process, without a GPU.

Two inputs:

* `convert_checkpoint(SAVE or SAVE/iter_NNNNNNN)`: a checkpoint written by the trainer under any ZeRO stage
  and any number of processes; the config and tokenizer come from its `hf_config/`.
* `convert_state_dict(FILE_OR_FOLDER, base_model=HF_DIR)`: a consolidated state dict, e.g. what DeepSpeed's
  `zero_to_fp32.py` (copied into every ZeRO save folder) writes; config and tokenizer come from `HF_DIR`.

Both check, before anything is written, that the weights are exactly the tensors the config's architecture
expects (names after stripping the trainer's `model.` prefix, and shapes); then write the folder described
in `hf_folder.py` into a temporary sibling of the output and rename it into place.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from moe_recipes.convert.sources import TensorSource, checkpoint_source, inspect_checkpoint, state_dict_source
from moe_recipes.fileio import is_out_of_space, out_of_space_error
from moe_recipes.hf_folder import (
    ModelLayout,
    TensorSpec,
    check_output,
    load_hf_config,
    model_layout,
    parse_size,
    publish,
    resolve_dtype,
    staging_dir,
    write_config_files,
    write_weights,
)

# Prefixes a source's keys may carry in front of the HF names: none, the trainer's objective (`model.`),
# a DDP/DeepSpeed wrapper (`module.`).
KEY_PREFIXES = ("", "model.", "module.")


def _examples(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _best_prefix(keys: list[str], expected: set[str]) -> tuple[int, str, dict[str, str]]:
    """(hits, prefix, stripped name -> key) for the prefix under which most `keys` are `expected` names."""
    best: tuple[int, str, dict[str, str]] | None = None
    for prefix in KEY_PREFIXES:
        mapped = {k[len(prefix) :]: k for k in keys if k.startswith(prefix)}
        hits = len(expected & mapped.keys())
        if best is None or hits > best[0]:
            best = (hits, prefix, mapped)
    assert best is not None
    return best


def match_keys(
    layout: ModelLayout, source: TensorSource, config_file: Path
) -> Callable[[TensorSpec], torch.Tensor]:
    """How to read each in-memory tensor of `layout` from `source`; a ValueError lists what does not fit.

    The source may hold the in-memory names (our checkpoints, zero_to_fp32's output, folders written before
    the released layout was) or the released ones (a Hugging Face folder): whichever fits more names, under
    the prefix that makes most names fit. Tied aliases (`lm_head.weight` with tied embeddings) may be
    present and are ignored; anything else missing, extra or of another shape means the config describes
    another architecture or size than the weights.
    """
    keys = source.keys()
    in_memory = {spec.name: spec.shape for spec in layout.specs}
    released = {f.name: f.shape for files in layout.released.pieces.values() for f in files}
    by_memory = _best_prefix(keys, set(in_memory))
    by_file = _best_prefix(keys, set(released))
    use_files = by_file[0] > by_memory[0]
    _, prefix, mapped = by_file if use_files else by_memory
    expected = released if use_files else in_memory
    allowed = expected.keys() | set(layout.tied)
    missing = [name for name in expected if name not in mapped]
    unexpected = [k for k in keys if not k.startswith(prefix) or k[len(prefix) :] not in allowed]
    wrong = [
        f"{name} {source.shape(mapped[name])} (expected {shape})"
        for name, shape in expected.items()
        if name in mapped and source.shape(mapped[name]) != shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing ({_examples(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_examples(unexpected)})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape ({_examples(wrong, 2)})")
        raise ValueError(
            f"{source.where}: the weights do not fit {layout.describe()} described by {config_file}: "
            + "; ".join(parts)
            + ". Are the config and the weights of the same architecture and size?"
        )
    if not use_files:
        return lambda spec: source.get(mapped[spec.name])

    def assemble(spec: TensorSpec) -> torch.Tensor:
        files = layout.released.pieces[spec.name]
        first = source.get(mapped[files[0].name])
        if len(files) == 1 and files[0].name == spec.name:
            return first
        whole = torch.empty(spec.shape, dtype=first.dtype)
        for f in files:
            f.put(whole, first if f is files[0] else source.get(mapped[f.name]))
        return whole

    return assemble


def _convert(
    open_source: Callable[[], TensorSource],
    hf_dir: Path,
    output: Path,
    dtype: str | torch.dtype | None,
    overwrite: bool,
    max_shard_size: str | int,
    protected: Iterable[Path],
    progress: bool,
) -> Path:
    """Check everything, then write the folder into a temporary sibling and rename it to `output`."""
    check_output(output, overwrite, protected)
    max_bytes = parse_size(max_shard_size)
    out_dtype = resolve_dtype(dtype, hf_dir)
    config = load_hf_config(hf_dir)
    layout = model_layout(config, out_dtype)
    source = open_source()
    fetch = match_keys(layout, source, hf_dir / "config.json")
    tmp = staging_dir(output)
    try:
        write_weights(tmp, layout, fetch, max_bytes, source.where, progress=progress)
        write_config_files(hf_dir, tmp, config, out_dtype)
        publish(tmp, output)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_out_of_space(err):
            raise out_of_space_error(err, output, sum(spec.nbytes for spec in layout.specs)) from err
        raise
    return output


def convert_checkpoint(
    checkpoint: str | Path,
    output_dir: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
    progress: bool = False,
) -> Path:
    """Convert `SAVE/iter_NNNNNNN` (or `SAVE`, via `latest`) to a Hugging Face folder; returns the folder.

    `output_dir` defaults to `<checkpoint>/hf`. `dtype`: "fp32", "bf16" or None for the dtype named in the
    base config (then config.json is copied unchanged). Works for every ZeRO stage and world size; an
    incomplete checkpoint or an existing output (without `overwrite`) raises before anything is written.
    """
    info = inspect_checkpoint(checkpoint)
    output = Path(output_dir) if output_dir else info.path / "hf"
    return _convert(
        lambda: checkpoint_source(info),
        info.hf_dir,
        output,
        dtype,
        overwrite,
        max_shard_size,
        [info.path],
        progress,
    )


def convert_state_dict(
    state_dict: str | Path,
    base_model: str | Path,
    output_dir: str | Path,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
    progress: bool = False,
) -> Path:
    """Convert a consolidated state dict (file or folder, e.g. zero_to_fp32.py's output) to an HF folder.

    Config, generation config and tokenizer come from `base_model`; a `model.` prefix on the keys (the
    trainer's module names) is stripped. Returns the output folder.
    """
    base = Path(base_model)
    if not base.is_dir():
        raise FileNotFoundError(f"base model folder {base} does not exist")
    return _convert(
        lambda: state_dict_source(state_dict),
        base,
        Path(output_dir),
        dtype,
        overwrite,
        max_shard_size,
        [Path(state_dict), base],
        progress,
    )
