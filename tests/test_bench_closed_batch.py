"""The closed-batch benchmark runs (small) so it never rots: the continuous decoder and static
batches give the same tokens (it checks that itself); its figures are printed, not asserted."""

import json

from bench import closed_batch


def test_closed_batch_small(capsys):
    result = closed_batch.main(["--small"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == result
    assert set(last) == {"requests", "batch", "admit_at", "continuous_vs_static_throughput", "static_tokens_per_s",
                         "continuous_tokens_per_s"}
    assert last["continuous_tokens_per_s"] > 0 and last["static_tokens_per_s"] > 0
