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
