"""The memory plan against the peak memory of real runs on CPU: training steps (one process per run) and the
model load at start-up (1 and 2 ranks under torchrun).

Separate from test_plan.py because it trains: four fresh processes, about a minute on two cores, and three
start-up launches, about another minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_recipes.config import load_config
from moe_recipes.train.plan import Hardware, meta_model, model_shape, plan, plan_for_shape
from tests.harness import free_port, launch_command

from .utils import write_config

REPO = Path(__file__).resolve().parents[2]

# The plan is for the steady state: step 2 runs its forward with the optimizer states of step 1 alive.
# Tiny models whose model state (tens of MB of parameters, 16+ bytes each) dominates interpreter noise.
TINY = {
    "mixtral-bf16-ckpt": (
        dict(arch="mixtral", hidden_size=384, num_layers=4, num_experts=8, expert_intermediate_size=768),
        # one micro-batch of 32 tokens a step: bf16 is emulated (40-60x slower) on CPUs without bf16 units,
        # and the bf16 model state this checks does not depend on the tokens
        [
            "train.precision=bf16",
            "train.activation_checkpointing=true",
            "train.micro_batch_size=1",
            "train.global_batch_size=1",
            "data.seq_length=32",
        ],
    ),
    "qwen2-fp32": (
        dict(arch="qwen2_moe", hidden_size=384, num_layers=4, num_experts=8, expert_intermediate_size=512),
        ["train.precision=fp32", "train.micro_batch_size=4", "data.seq_length=128"],
    ),
}
ENGINES = {"zero2": ["distributed.zero_stage=2"], "fsdp2": ["distributed.engine=fsdp2"]}
MEASURE_TOLERANCE = 0.25


def _probe_env() -> dict[str, str]:
    """Only what a fresh shell would have: variables earlier tests of this session left in os.environ (a
    run's RANK/MASTER_*, allocator settings) must not change what the probes measure."""
    return {
        # (and the AVX2 limits of a suite that reproduces an AVX2-only CPU, see tests/test_precision.py)
        **{
            k: os.environ[k]
            for k in ("PATH", "HOME", "LANG", "TMPDIR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
            if k in os.environ
        },
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
        "OMP_NUM_THREADS": "1",
        # glibc raises its mmap threshold as large blocks are freed, after which freed tensors stay in the
        # heap and in the resident set: the peak RSS then counts memory the run no longer holds. A fixed
        # threshold maps every large tensor on its own and unmaps it when freed, so the RSS follows live
        # memory, which is what the plan (and a GPU's allocator statistics) describe.
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
        "THP_MEM_ALLOC_ENABLE": "0",  # as the trainer runs without the moe-recipes command
    }


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from moe_recipes.models.init import init_model

    out = {}
    for name, (spec, _) in TINY.items():
        folder = tmp_path_factory.mktemp("plan_models") / name
        out[name] = init_model(
            tokenizer_dir=str(REPO / "demo" / "tokenizer"),
            output_dir=str(folder),
            num_heads=4,
            top_k=2,
            max_position_embeddings=512,
            **spec,
        )
    return out


@pytest.fixture(scope="module")
def measured_runs(tmp_path_factory, tiny_models, tiny_dataset):
    """(planned bytes, measured peak growth) of every tiny model x engine, the runs started together.

    Each run is a fresh process (`peak_probe.py`): the peaks do not mix, and starting them at once keeps
    the wall time of the four runs near that of two on two cores.
    """
    env = _probe_env()
    started = {}
    for name, (_, extra) in TINY.items():
        for engine, engine_extra in ENGINES.items():
            tmp = tmp_path_factory.mktemp(f"{name}-{engine}")
            args = [*extra, *engine_extra, "train.iters=2", "eval.iters=1"]
            path = write_config(tmp, tiny_models[name], tiny_dataset, *args)
            cfg = load_config(path)
            planned = plan(cfg, cfg.model.path, Hardware(gpus_per_node=1)).device_total
            probe = [sys.executable, str(Path(__file__).parent / "peak_probe.py"), str(path)]
            proc = subprocess.Popen(probe, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            started[name, engine] = (planned, proc)
    results = {}
    for key, (planned, proc) in started.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        measured = json.loads(out.strip().splitlines()[-1])
        assert measured["rc"] == 0
        results[key] = (planned, measured["growth"])
    return results


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("name", sorted(TINY))
def test_plan_matches_measured_peak(measured_runs, name, engine):
    planned, measured = measured_runs[name, engine]
    print(f"{name} {engine}: planned {planned / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB")
    assert planned == pytest.approx(measured, rel=MEASURE_TOLERANCE)


# Start-up: each engine's model load on CPU (where the GPU's bytes are host bytes too), against the plan's
# start-up estimate of the busiest rank. A Qwen3-MoE of 86 M parameters saved in bf16, as released checkpoints
# are: the model (344 MB in fp32) dominates the noise of the imports.
STARTUPS = {"zero2": (1, "distributed.zero_stage=2"), "fsdp2": (2, "distributed.engine=fsdp2"),
            "zero3": (2, "distributed.zero_stage=3"), "zero3-rank0": (2, "distributed.zero_stage=3")}  # fmt: skip


@pytest.fixture(scope="module")
def startup_model(tmp_path_factory) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1024,
        moe_intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_experts=16,
        num_experts_per_tok=2,
    )
    folder = tmp_path_factory.mktemp("startup") / "qwen3-moe"
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(str(folder))
    return str(folder)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "engine",
    # `make test`: the sharded starts (FSDP2, ZeRO-3 partitioned). `make test-slow`: ZeRO 0-2's whole load on
    # one rank, and ZeRO-3's fallback (rank 0 reads the whole checkpoint, the others build on meta)
    [
        pytest.param(e, marks=pytest.mark.slow) if e in ("zero2", "zero3-rank0") else e
        for e in sorted(STARTUPS)
    ],
)
def test_startup_plan_matches_measured_load(startup_model, engine):
    world, override = STARTUPS[engine]
    cfg = load_config(None, [f"model.path={startup_model}", "data.path=unused", override])
    cfg.train.global_batch_size, cfg.train.micro_batch_size = world, 1
    if engine == "zero3-rank0":  # ZeRO-3's fallback, planned as for a folder without safetensors (one of its
        # triggers); the probe loads the same weights the fallback's way (from_pretrained under zero.Init)
        shape = model_shape(meta_model(startup_model), cfg)
        startup = plan_for_shape(cfg, shape, Hardware(gpus_per_node=world), safetensors=False).startup
        assert startup.mode == "rank0_reads"
    else:
        startup = plan(cfg, startup_model, Hardware(gpus_per_node=world)).startup
    cmd = launch_command("torchrun", "tests.train.startup_probe", [engine, startup_model], world, free_port())
    out = subprocess.run(cmd, env=_probe_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    decoder = json.JSONDecoder()  # a rank's line may run on into another rank's output
    rows = [decoder.raw_decode(part)[0] for part in out.stdout.split("RESULT ")[1:]]
    growth = {r["rank"]: r["growth"] for r in rows}
    assert sorted(growth) == list(range(world))
    planned = startup.on_cpu()
    measured = ", ".join(f"rank {r} {growth[r] / 2**20:.0f}" for r in sorted(growth))
    print(f"{engine} on {world}: planned {planned / 2**20:.0f} MiB, measured {measured} MiB")
    assert planned == pytest.approx(max(growth.values()), rel=MEASURE_TOLERANCE)
    if engine == "zero3-rank0":  # rank 0 alone reads the checkpoint (the others read it as meta)
        assert startup.host_other_ranks == 0 and growth[1] < growth[0]
        assert growth[0] - growth[1] == pytest.approx(startup.on_cpu() - startup.on_cpu(rank0=False), rel=0.5)
    if engine in ("fsdp2", "zero3"):  # every rank reads its own half: about half of the whole load
        assert startup.mode in ("sharded", "partitioned")
        assert growth[0] == pytest.approx(growth[1], rel=0.1)
