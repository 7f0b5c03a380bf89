"""A reader that knows only the released tensor names loads our converted folders: transformers 4.x.

transformers 4.57 has no load-time conversion: given transformers 5's fused in-memory expert tensors it loads a
Mixtral or Qwen2-MoE with randomly initialised experts (a warning, no error) and fails on Qwen3-MoE. So its
logits equal transformers 5's only when the folder holds the released layout. The test builds its own
virtual environment (`.venv-transformers4/` in the repository, git-ignored, reused by later runs) with the last
4.x release and the project's torch; it is slow (one install) and skips only when no package index answers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_recipes.convert.hf import convert_state_dict

REPO = Path(__file__).resolve().parents[2]
TRANSFORMERS_4 = "4.57.6"  # the last 4.x release
VENV = REPO / ".venv-transformers4"

# Tiny configs of the three families whose released and in-memory layouts differ.
FAMILIES = {
    "mixtral": {"intermediate_size": 24, "num_local_experts": 4},
    "qwen2_moe": {
        "intermediate_size": 48,
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 24,
        "num_experts": 4,
        "decoder_sparse_step": 1,
    },
    "qwen3_moe": {"intermediate_size": 48, "moe_intermediate_size": 24, "num_experts": 4},
}
_COMMON = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts_per_tok": 2,
    "vocab_size": 128,
}

# What pip says when it cannot reach an index (the only reason to skip rather than fail).
_UNREACHABLE = ("Could not find a version", "No matching distribution", "connection", "Connection", "resolve")

# Writes each family's config.json with transformers 4's own classes, as released checkpoints hold it
# (transformers 5 reads it; 4.x cannot read every key 5 writes, e.g. Qwen3-MoE's num_local_experts).
CONFIG_WRITER = """
import json, sys
from transformers import AutoConfig
out, sizes = sys.argv[1], json.loads(sys.argv[2])
AutoConfig.for_model(sizes.pop("model_type"), **sizes).save_pretrained(out)
"""

READER = """
import sys, torch
from transformers import AutoModelForCausalLM
folder, ids_file, out_file = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, attn_implementation="eager")
model.eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(ids_file)).logits, out_file)
"""


def _torch_version() -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.startswith("torch=="):
            return line.removeprefix("torch==").strip()
    raise AssertionError("constraints.txt pins no torch version")


def _transformers4_python() -> Path:
    """The virtual environment's python, installed on first use; skip when no package index can be reached."""
    python = VENV / "bin" / "python"
    stamp = VENV / f".installed-{TRANSFORMERS_4}"
    if stamp.is_file():
        return python
    venv.create(VENV, with_pip=True, clear=True)
    pip = [str(python), "-m", "pip"]
    quiet = ["-q", "--disable-pip-version-check"]
    probe = subprocess.run(
        [*pip, "download", *quiet, "--no-deps", "-d", str(VENV / "probe"), f"transformers=={TRANSFORMERS_4}"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        if not any(word in probe.stderr for word in _UNREACHABLE):
            raise AssertionError(
                f"pip download transformers=={TRANSFORMERS_4} failed:\n{probe.stderr[-2000:]}"
            )
        pytest.skip(
            f"no package index reachable for transformers=={TRANSFORMERS_4}: {probe.stderr.strip()[-300:]}"
        )
    for spec in ([f"torch=={_torch_version()}"], [f"transformers=={TRANSFORMERS_4}", "safetensors"]):
        result = subprocess.run([*pip, "install", *quiet, *spec], capture_output=True, text=True)
        assert result.returncode == 0, f"pip install {spec} failed:\n{result.stderr[-2000:]}"
    stamp.write_text("")
    return python


def _run_4(python: Path, script: str, *args: str) -> str:
    """Run `script` under transformers 4; its stderr (warnings included) is returned."""
    run = subprocess.run(
        [str(python), "-c", script, *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path(args[0]).parent)},
    )
    assert run.returncode == 0, f"transformers {TRANSFORMERS_4} failed:\n{run.stderr[-3000:]}"
    return run.stderr


@pytest.mark.slow
def test_transformers_4_loads_converted_folders_with_the_same_logits(tmp_path):
    python = _transformers4_python()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "ids.pt")
    for arch, sizes in FAMILIES.items():
        base = tmp_path / arch / "base"
        _run_4(python, CONFIG_WRITER, str(base), json.dumps({"model_type": arch, **_COMMON, **sizes}))
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base))).eval()
        torch.save(model.state_dict(), tmp_path / arch / "state.pt")  # in-memory names, as ZeRO holds them
        folder = convert_state_dict(tmp_path / arch / "state.pt", base, tmp_path / arch / "converted")
        with torch.no_grad():
            expected = AutoModelForCausalLM.from_pretrained(str(folder)).eval()(input_ids=ids).logits
        out = tmp_path / arch / "logits4.pt"
        stderr = _run_4(python, READER, str(folder), str(tmp_path / "ids.pt"), str(out))
        assert "newly initialized" not in stderr, f"{arch}: transformers 4 left weights random:\n{stderr}"
        diff = (torch.load(out) - expected).abs().max().item()
        print(f"[transformers {TRANSFORMERS_4}] {arch}: max abs logit difference {diff:.2e}", file=sys.stderr)
        assert diff < 1e-4, f"{arch}: transformers 4 logits differ by {diff}"
