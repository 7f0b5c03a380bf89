from moe_recipes.train.objective import CHUNK_LOGIT_BYTES, loss_chunk_tokens


def test_default_chunk_holds_a_fixed_budget_of_fp32_logits():
    for vocab in (32000, 129280, 151936):
        tokens = loss_chunk_tokens(None, vocab)
        assert tokens % 64 == 0 and tokens * vocab * 4 <= CHUNK_LOGIT_BYTES < (tokens + 64) * vocab * 4
    assert loss_chunk_tokens(None, 10**8) == 64  # never below one small chunk
    assert loss_chunk_tokens(0, 32000) == 0  # 0: full logits
    assert loss_chunk_tokens(300, 32000) == 300
