"""The benchmarks run (small shapes) so they never rot; their figures are printed, not asserted."""

import json

from bench import train_throughput


def test_train_throughput_small(capsys):
    result = train_throughput.main(["--small", "--epochs", "1"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == result
    assert set(last) == {"packed_samples_per_s", "official_samples_per_s", "ratio"}
    assert all(v > 0 for v in last.values())
