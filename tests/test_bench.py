"""The benchmarks run (small shapes) so they never rot; their figures are printed, not asserted."""

import json

from bench import train_throughput


def test_train_throughput_small(capsys):
    result = train_throughput.main(["--small", "--epochs", "1"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == result
    assert set(last) == {"packed_samples_per_s", "official_samples_per_s", "ratio"}
    assert all(v > 0 for v in last.values())


def test_gpu_bench_small_on_cpu(tmp_path, capsys):
    from bench.gpu import bench

    result = bench.main(["--small", "--out", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == json.loads(json.dumps(result))
    model = saved["models"]["small"]
    assert [r["pack"] for r in model["training"]] == [1, 1, 2]
    assert [r["batch"] for r in model["serving"]] == [1, 2]
    assert all(r["samples_per_s"] > 0 for r in model["training"])
