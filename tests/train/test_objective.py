import pytest

from moe_recipes.train.objective import CHUNK_LOGIT_BYTES, loss_chunk_tokens


def test_default_chunk_holds_a_fixed_budget_of_fp32_logits():
    for vocab in (32000, 129280, 151936):
        tokens = loss_chunk_tokens(None, vocab)
        assert tokens % 64 == 0 and tokens * vocab * 4 <= CHUNK_LOGIT_BYTES < (tokens + 64) * vocab * 4
    assert loss_chunk_tokens(None, 10**8) == 64  # never below one small chunk
    assert loss_chunk_tokens(0, 32000) == 0  # 0: full logits
    assert loss_chunk_tokens(300, 32000) == 300


def test_padded_chat_batch_routes_only_its_real_tokens_into_router_stats(tiny_mixtral):
    """A right-padded batch (rows of 7 and 3 real tokens) gives the expert counts and the load-balancing
    loss of its real tokens: the same as running each row alone, without padding."""
    import torch
    from transformers import AutoModelForCausalLM

    from moe_recipes.models.inspect import inspect_model
    from moe_recipes.models.losses import pooled_load_balancing_loss
    from moe_recipes.train.objective import CausalLMObjective

    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral).eval()
    info = inspect_model(model)
    objective = CausalLMObjective(model, info, aux_coef=0.01, z_coef=0.001, chunk_size=0, bf16=False)
    torch.manual_seed(0)
    rows = [torch.randint(5, 1000, (7,)), torch.randint(5, 1000, (3,))]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)], mask[r, : len(row)] = row, 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    with torch.no_grad():
        padded = objective(input_ids=ids, labels=labels, attention_mask=mask)
        alone, logits = [], []
        for row in rows:
            out = objective(input_ids=row[None], labels=row[None])
            alone.append(out["expert_counts"])
            logits.append(objective.capture.layers())
    assert torch.equal(padded["expert_counts"], alone[0] + alone[1])
    real = [
        (torch.cat([logits[0][i][0], logits[1][i][0]]), torch.cat([logits[0][i][1], logits[1][i][1]]))
        for i in range(len(logits[0]))
    ]
    expected = pooled_load_balancing_loss(real, info.num_experts, info.top_k)
    assert padded["aux_loss"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_packed_chat_batch_leaves_its_padded_tail_out_of_router_stats(tiny_mixtral):
    """A packed batch carries no padding mask (position ids keep conversations apart); its `real_tokens`
    keep the padded tail out of the expert counts and the balancing and z losses, and out of the token
    count behind tokens/s."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from moe_recipes.data.packing import ChatCollator
    from moe_recipes.models.inspect import inspect_model
    from moe_recipes.train.objective import CausalLMObjective
    from moe_recipes.train.trainer import _token_counts

    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral).eval()
    info = inspect_model(model)
    objective = CausalLMObjective(model, info, aux_coef=0.01, z_coef=0.001, chunk_size=0, bf16=False)
    rng = np.random.default_rng(0)
    full = {"input_ids": rng.integers(5, 1000, 9), "position_ids": np.array([0, 1, 2, 3, 0, 1, 2, 3, 4])}
    short = {"input_ids": rng.integers(5, 1000, 5), "position_ids": np.arange(5)}
    for s in (full, short):
        s["labels"] = np.r_[s["input_ids"][1:], -100]
    batch = ChatCollator(pad_id=2, packed=True)([full, short])  # row 1: 5 real tokens, a 4-token tail
    tail_free = ChatCollator(pad_id=2, packed=True)([short])
    with torch.no_grad():
        packed = objective(**batch)
        row0 = objective(**ChatCollator(pad_id=2, packed=True)([full]))
        row1 = objective(**tail_free)
    assert torch.equal(packed["expert_counts"], row0["expert_counts"] + row1["expert_counts"])
    blind = {k: v for k, v in batch.items() if k != "real_tokens"}  # what the objective saw before
    with torch.no_grad():
        counted_tail = objective(**blind)
    assert not torch.equal(counted_tail["expert_counts"], packed["expert_counts"])
    assert _token_counts([batch]).tolist() == [float((batch["labels"] != -100).sum()), 14.0]
