"""Data-parallel batch sampler for pre-training (Megatron's MegatronPretrainingSampler).

The global sample order is simply 0, 1, 2, ... (the datasets shuffle internally), so the training
position is one number, `consumed_samples`, and resuming from a checkpoint is exact: a sampler started
at `consumed_samples = c` yields the tail of the order an uninterrupted run would have seen from c on.
"""

from __future__ import annotations

from collections.abc import Iterator


class PretrainBatchSampler:
    """Yields, for this data-parallel rank, the list of sample indices of each micro batch.

    Each global micro step covers `micro_batch_size * dp_size` consecutive indices starting at
    `consumed_samples`; rank r takes `[start + r * mbs, start + (r + 1) * mbs)`. A final global micro
    step with fewer than `micro_batch_size * dp_size` samples left is dropped, so all ranks always run
    the same number of steps. Usable as `torch.utils.data.DataLoader(dataset, batch_sampler=sampler)`.
    """

    def __init__(
        self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ):
        for name, value, low in (
            ("total_samples", total_samples, 0),
            ("consumed_samples", consumed_samples, 0),
            ("micro_batch_size", micro_batch_size, 1),
            ("dp_size", dp_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"PretrainBatchSampler: {name} must be an integer >= {low}, got {value!r}")
        if consumed_samples > total_samples:
            raise ValueError(
                f"PretrainBatchSampler: consumed_samples {consumed_samples} > total_samples {total_samples}"
            )
        if isinstance(dp_rank, bool) or not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"PretrainBatchSampler: dp_rank must be in [0, {dp_size}), got {dp_rank!r}")
        self.total_samples, self.consumed_samples = total_samples, consumed_samples
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    @property
    def global_micro_batch_size(self) -> int:
        """Samples consumed by all ranks together in one micro step."""
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        """Micro batches this rank will yield."""
        return (self.total_samples - self.consumed_samples) // self.global_micro_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.global_micro_batch_size
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        for start in range(first, first + len(self) * step, step):
            yield list(range(start, start + self.micro_batch_size))
