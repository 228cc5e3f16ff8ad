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
    from yollava.checkpoints import SHAPES

    assert (SHAPES["7b"].vocab, SHAPES["13b"].vocab, SHAPES["13b"].hidden, SHAPES["7b"].num_image_tokens) == \
        (32064, 32064, 5120, 576)

    result = bench.main(["--small", "--out", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == json.loads(json.dumps(result))
    model = saved["models"]["small"]
    # the real LLaVA-1.5 vocabulary (the tests' tokenizer copy), as the 7b/13b runs on a GPU use
    assert model["vocab"] == {"rows": 32064, "tokens": 32002, "image_tokens": 16}
    assert model["shape"] == "llava-1.5-small"
    assert [r["pack"] for r in model["training"]] == [1, 1, 2]
    assert [r["batch"] for r in model["serving"]] == [1, 2]
    assert all(r["samples_per_s"] > 0 for r in model["training"])
